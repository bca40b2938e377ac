"""Our SentencePiece tokenizer as a Hugging Face one: ``tokenizer.json`` (the ``tokenizers``
library's format) + ``tokenizer_config.json``, so ``AutoTokenizer.from_pretrained(dir)`` loads
it without sentencepiece or nsa_dist and gives our ids.

The SentencePiece model (``nsa_dist.data.tokenizer``: BPE, identity normalisation, spaces as
``▁``, no dummy prefix, byte fallback, ``\\n`` a user-defined piece) maps onto a ``tokenizers``
BPE model with the same vocabulary: SentencePiece merges the adjacent pair whose joined piece
scores highest, so every split of a piece into two known pieces becomes a merge ranked by that
piece's score. Spaces become ``▁`` in a normaliser; ``\\n`` is an added token, cut out before
the model as SentencePiece's user-defined symbols are; characters outside the vocabulary fall
back to ``<0xXX>`` byte pieces. Special pieces written in the text (``<s>``, ``</s>``) are
encoded as text, as SentencePiece does (``split_special_tokens``). Encoding adds BOS (our
documents are ``[BOS] text [EOS]``); ``add_special_tokens=False`` gives ``Tokenizer.encode``'s ids.
"""
from __future__ import annotations

import json

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6  # SentencePiece piece types
SPACE = "\u2581"  # what SentencePiece writes for a space


def _model_proto(model_bytes: bytes):
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as err:
        raise ImportError("exporting the tokenizer needs sentencepiece with protobuf: "
                          "pip install sentencepiece protobuf") from err
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    return proto


def _check_supported(proto, where: str) -> None:
    """The exporter maps the settings ``tools/train_tokenizer.py`` uses; refuse others."""
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    problems = []
    if trainer.model_type != 2:  # BPE
        problems.append("model_type is not bpe")
    if norm.name != "identity" or norm.precompiled_charsmap:
        problems.append(f"normalisation {norm.name!r} (expected identity)")
    if norm.add_dummy_prefix or norm.remove_extra_whitespaces or not norm.escape_whitespaces:
        problems.append("whitespace handling differs (expected no dummy prefix, extra whitespace kept, "
                        "spaces escaped)")
    if not trainer.byte_fallback:
        problems.append("no byte fallback")
    if problems:
        raise ValueError(f"tokenizer {where}: cannot export to Hugging Face exactly: {'; '.join(problems)}; "
                         f"train it with tools/train_tokenizer.py")


def build_hf_tokenizer(model_bytes: bytes, where: str = "tokenizer.model"):
    """A ``tokenizers.Tokenizer`` giving the SentencePiece model's ids (see the module doc)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    proto = _model_proto(model_bytes)
    _check_supported(proto, where)
    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    merges = []
    for i, p in enumerate(pieces):
        if p.type != _NORMAL or len(p.piece) < 2:
            continue
        for cut in range(1, len(p.piece)):
            left, right = p.piece[:cut], p.piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-p.score, i, vocab[left], vocab[right], left, right))
    merges.sort()
    unk = next(p.piece for p in pieces if p.type == _UNKNOWN)
    tok = Tokenizer(models.BPE(vocab, [(m[4], m[5]) for m in merges], unk_token=unk, byte_fallback=True,
                               fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                            for p in pieces if p.type in (_UNKNOWN, _CONTROL)])
    tok.add_tokens([AddedToken(p.piece, special=False, normalized=False, single_word=False, lstrip=False,
                               rstrip=False) for p in pieces if p.type == _USER_DEFINED])
    bos = pieces[proto.trainer_spec.bos_id].piece
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, proto.trainer_spec.bos_id)])
    return tok


def hf_tokenizer_files(model_bytes: bytes, max_length: int, where: str = "tokenizer.model") -> dict[str, str]:
    """File name -> text of the Hugging Face tokenizer files of a SentencePiece model."""
    proto = _model_proto(model_bytes)
    spec = proto.trainer_spec
    piece = lambda i: proto.pieces[i].piece  # noqa: E731
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": piece(spec.bos_id), "eos_token": piece(spec.eos_id), "unk_token": piece(spec.unk_id),
        "pad_token": piece(spec.pad_id),
        "clean_up_tokenization_spaces": False,  # decode must give the text back exactly
        "split_special_tokens": True,  # "<s>" in the text is text, as in SentencePiece
        "model_max_length": int(max_length),
    }
    return {"tokenizer.json": build_hf_tokenizer(model_bytes, where).to_str(pretty=True),
            "tokenizer_config.json": json.dumps(config, indent=2) + "\n"}

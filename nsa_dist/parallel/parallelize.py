"""Parallelise a single-device NSADecoderLM from outside (torchtitan style).

``parallelize(model, state, megatron_sp=False, comm_stats=None)`` returns a new module whose
parameters are slices of ``model``'s (the full model is built from a seed on every rank, so
every layout starts from the same weights as one device). Inputs are always the full
sequence ``input_ids [B, S]`` (and labels, cu_seqlens, position_ids): each rank takes its
Ulysses shard itself. The loss is the global mean over non-ignored labels, identical on
every rank of the TP and Ulysses groups. Logits stay split: ``[B, S_local, V/tp]``.

Gradient contract: after ``loss.backward()`` every parameter's gradient is complete over
TP (replicated parameters already summed); over Ulysses each rank holds its sequence
shard's part, summed by the data-parallel reduction over the sequence-data-parallel group
(DeepSpeed does this when given ``state.mpu()``; without DeepSpeed call ``sync_grads``).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from ..models.decoder import DecoderBlock, LMOutput, NSADecoderLM, run_layers
from ..models.flops import training_flops_per_token
from ..modules.attention import NSAAttention
from ..modules.dense import DenseAttention
from . import collectives as C
from .comm_stats import CommStats, Meter
from ..models.loss import chunked_loss_sum
from .cross_entropy import vocab_parallel_cross_entropy
from .dense_parallel import ParallelDenseAttention
from .layers import SEQ_DIM, ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, shard_param
from .nsa_parallel import ParallelNSAAttention
from .state import ParallelState, check_model_layout, check_seq_len


def _norm_copy(norm: nn.RMSNorm) -> nn.RMSNorm:
    n = copy.deepcopy(norm)
    for p in n.parameters():
        p.nsa_shard = None
    return n


class ParallelDecoderBlock(nn.Module):
    """DecoderBlock with TP attention (NSA, or the dense baseline) and MLP; norms replicated (gradients summed over TP
    under Megatron SP, where each rank normalises a different sequence shard)."""

    def __init__(self, block: DecoderBlock, state: ParallelState, megatron_sp: bool,
                 meter: Optional[Meter], selection_comm: str = "auto"):
        super().__init__()
        tp, r, g = state.tp, state.tp_rank, state.tp_group
        self.state, self.megatron_sp, self.meter = state, megatron_sp, meter
        self.attn_norm, self.mlp_norm = _norm_copy(block.attn_norm), _norm_copy(block.mlp_norm)
        if isinstance(block.attn, NSAAttention):
            self.attn = ParallelNSAAttention(block.attn, state, megatron_sp, _sub(meter, "attn"), selection_comm)
        elif isinstance(block.attn, DenseAttention):
            self.attn = ParallelDenseAttention(block.attn, state, megatron_sp, _sub(meter, "attn"))
        else:
            raise TypeError(f"no parallel version of {type(block.attn).__name__}")
        inner = block.mlp.gate_proj.weight.shape[0]
        if inner % tp:
            raise ValueError(f"MLP width {inner} is not divisible by tp={tp}; set intermediate_size "
                             f"to a multiple of {tp}")
        per = inner // tp
        mm = _sub(meter, "mlp")
        self.mlp = nn.Module()
        self.mlp.gate_proj = ColumnParallelLinear.from_linear(block.mlp.gate_proj, r * per, (r + 1) * per, g,
                                                              input_mode="none", meter=mm)
        self.mlp.up_proj = ColumnParallelLinear.from_linear(block.mlp.up_proj, r * per, (r + 1) * per, g,
                                                            input_mode="none", meter=mm)
        self.mlp.down_proj = RowParallelLinear.from_linear(
            block.mlp.down_proj, r * per, (r + 1) * per, g,
            output_mode="reduce_scatter_seq" if megatron_sp else "reduce", meter=mm)

    def _norm(self, norm: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
        w = norm.weight
        if self.megatron_sp and w is not None:
            w = C.reduce_grad(w, self.state.tp_group, _sub(self.meter, "norm_grads"))
        return nn.functional.rms_norm(x, norm.normalized_shape, w, norm.eps)

    def forward(self, h, cu_seqlens, position_ids, return_stats: bool):
        a, stats = self.attn(self._norm(self.attn_norm, h), cu_seqlens=cu_seqlens,
                             position_ids=position_ids, return_stats=return_stats)
        h = h + a
        x = self._norm(self.mlp_norm, h)
        mm = _sub(self.meter, "mlp")
        if self.megatron_sp:
            x = C.gather_along(x, SEQ_DIM, self.state.tp_group, mm)
        else:
            x = C.copy_to_region(x, self.state.tp_group, mm)
        m = self.mlp.down_proj(nn.functional.silu(self.mlp.gate_proj(x)) * self.mlp.up_proj(x))
        return h + m, stats


def _sub(meter: Optional[Meter], name: str) -> Optional[Meter]:
    return None if meter is None else meter.sub(name)


class ParallelDecoderLM(nn.Module):
    """NSADecoderLM over a ParallelState (see module docstring for the contract)."""

    def __init__(self, model: NSADecoderLM, state: ParallelState, megatron_sp: bool = False,
                 comm_stats: Optional[CommStats] = None, selection_comm: str = "auto"):
        super().__init__()
        cfg = model.config
        check_model_layout(cfg.num_heads, cfg.num_kv_heads, state.tp, state.sp, cfg.vocab_size,
                           None, megatron_sp)
        if megatron_sp and state.sp > 1:
            raise ValueError("megatron_sp=True needs sp=1 (Ulysses already shards the sequence)")
        if state.head_parallel > 1 and state.tp_group is None:
            raise ValueError("tp*sp > 1 needs process groups: initialise torch.distributed first")
        self.config, self.state, self.megatron_sp = cfg, state, megatron_sp
        self.comm_stats = comm_stats
        self.gradient_checkpointing = model.gradient_checkpointing
        self.loss_chunk = getattr(model, "loss_chunk", 0)
        root = comm_stats.meter("") if comm_stats is not None else None
        tp, r, g = state.tp, state.tp_rank, state.tp_group
        mode = "reduce_scatter_seq" if megatron_sp else "reduce"
        self.embed = VocabParallelEmbedding.from_embedding(model.embed, r, tp, g, output_mode=mode,
                                                           meter=_sub(root, "embed"))
        self.layers = nn.ModuleList(ParallelDecoderBlock(b, state, megatron_sp, _sub(root, f"layers.{i}"),
                                                         selection_comm)
                                    for i, b in enumerate(model.layers))
        self.norm = _norm_copy(model.norm)
        self.tied = cfg.tie_embeddings
        if not self.tied:
            per = cfg.vocab_size // tp
            self.lm_head = nn.Module()
            self.lm_head.weight = shard_param(model.lm_head.weight, 0, r * per, (r + 1) * per)
        self._head_meter = _sub(root, "lm_head")
        # Whole-model figures (a trainer's MFU and logs), fixed at parallelisation.
        self._full_params = model.num_parameters()
        self._full_params_no_emb = model.num_parameters(exclude_embeddings=True)
        self._matmul_params = model.matmul_parameters()

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters of the whole (single-device) model, not of this rank's shard."""
        return self._full_params_no_emb if exclude_embeddings else self._full_params

    def local_num_parameters(self) -> int:
        """Parameters held by this rank (shards and replicas)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of the whole model (divide by tp * sp for one rank's share)."""
        return training_flops_per_token(seq_len, self.config, self._matmul_params)

    # ------------------------------------------------------------------ names
    def full_names(self) -> dict[str, str]:
        """Local parameter name -> the single-device model's parameter name."""
        out = {}
        for name, _ in self.named_parameters():
            parts = name.split(".")
            if len(parts) > 3 and parts[0] == "layers" and parts[2] == "attn":
                local = ".".join(parts[3:])
                full = self.layers[int(parts[1])].attn.full_names.get(local, local)
                out[name] = ".".join(parts[:3] + [full])
            else:
                out[name] = name
        return out

    # ------------------------------------------------------------------ forward
    def _shard(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else C.local_chunk(t, 1, self.state.sp_group)

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                return_stats: bool = False) -> LMOutput:
        """input_ids, labels: full sequence [B, S]. Returns LMOutput(loss (global mean),
        logits [B, S/sp, V/tp] of this rank, stats of this rank's heads or None)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} must equal input_ids shape "
                             f"{tuple(input_ids.shape)}")
        st = self.state
        check_seq_len(input_ids.shape[1], st.tp, st.sp, self.megatron_sp)
        h, all_stats = run_layers(self, self.embed(self._shard(input_ids)), cu_seqlens, position_ids,
                                  return_stats)
        w = self.norm.weight
        if self.megatron_sp and w is not None:
            w = C.reduce_grad(w, st.tp_group, self._head_meter)
        h = nn.functional.rms_norm(h, self.norm.normalized_shape, w, self.norm.eps)
        if self.megatron_sp:
            h = C.gather_along(h, SEQ_DIM, st.tp_group, self._head_meter)
        else:
            h = C.copy_to_region(h, st.tp_group, self._head_meter)
        head_w = self.embed.weight if self.tied else self.lm_head.weight
        if labels is not None and self.loss_chunk > 0:  # no full logits (see models/loss.py)
            lab = self._shard(labels).reshape(-1)

            def token_losses(hc, lc):
                return vocab_parallel_cross_entropy(nn.functional.linear(hc, head_w), lc,
                                                    self.embed.vocab_start, st.tp_group, self._head_meter)
            tok_sum = chunked_loss_sum(h.reshape(-1, h.shape[-1]), lab, self.loss_chunk, token_losses)
            total = C.reduce_from_region(tok_sum, st.sp_group, self._head_meter)
            count = C.all_reduce_((lab != -100).sum().to(tok_sum.dtype), st.sp_group)
            return LMOutput(total / count, None, all_stats if return_stats else None)
        logits = nn.functional.linear(h, head_w)  # [B, S_local, V/tp]
        loss = None
        if labels is not None:
            lab = self._shard(labels).reshape(-1)
            tok = vocab_parallel_cross_entropy(logits.reshape(-1, logits.shape[-1]), lab,
                                               self.embed.vocab_start, st.tp_group, self._head_meter)
            total = C.reduce_from_region(tok.sum(), st.sp_group, self._head_meter)
            count = C.all_reduce_((lab != -100).sum().to(tok.dtype), st.sp_group)
            loss = total / count
        return LMOutput(loss, logits, all_stats if return_stats else None)


def parallelize(model: NSADecoderLM, state: ParallelState, megatron_sp: bool = False,
                comm_stats: Optional[CommStats] = None, selection_comm: str = "auto") -> ParallelDecoderLM:
    """The parallel version of ``model`` for this rank (``model`` itself is not modified).

    megatron_sp: shard norms/residuals along the sequence inside TP (needs sp=1).
    comm_stats: where collectives record their bytes (reset it every step).
    selection_comm: how ranks sharing a KV head agree on the selection when tp*sp > H
    ("importance" all-reduce, "gather_q", or "auto": the smaller; see nsa_parallel).

    Collective: every rank of the world must call it (it may create process groups).
    """
    if not isinstance(model, NSADecoderLM):
        raise TypeError(f"parallelize expects an NSADecoderLM, got {type(model).__name__}")
    return ParallelDecoderLM(model, state, megatron_sp, comm_stats, selection_comm)


# ---------------------------------------------------------------------- gradients and gathering
def sync_grads(model: nn.Module, state: ParallelState) -> None:
    """Without DeepSpeed: sum gradients over Ulysses ranks and average over data parallel
    (one all-reduce over the sequence-data-parallel group, divided by dp)."""
    for p in model.parameters():
        if p.grad is not None and state.sp * state.dp > 1:
            C.all_reduce_(p.grad, state.sdp_group)
            p.grad.div_(state.dp)


def grad_norm(model: nn.Module, state: ParallelState) -> torch.Tensor:
    """Global L2 norm of the gradients, each element of the full model counted once.

    Call after ``sync_grads`` (every rank then holds the same gradients per TP shard):
    shards count on every TP rank, replicas on TP rank 0 only (``tensor_model_parallel``,
    as DeepSpeed does), summed over TP. Returns a scalar float32 tensor, the same on all ranks.
    """
    seen, total = set(), None
    for p in model.parameters():
        if id(p) in seen or p.grad is None:
            continue
        seen.add(id(p))
        if getattr(p, "tensor_model_parallel", False) or state.tp_rank == 0:
            sq = p.grad.detach().float().pow(2).sum()
            total = sq if total is None else total + sq
    if total is None:
        total = torch.zeros((), device=next(model.parameters()).device)
    return C.all_reduce_(total, state.tp_group).sqrt()


def _full_name_map(module: nn.Module) -> dict[str, str]:
    if hasattr(module, "full_names"):
        names = module.full_names
        return names() if callable(names) else {n: names.get(n, n) for n, _ in module.named_parameters()}
    return {n: n for n, _ in module.named_parameters()}


@torch.no_grad()
def gather_full(module: nn.Module, state: ParallelState, what: str = "param") -> dict[str, torch.Tensor]:
    """Every parameter (``what="param"``) or gradient (``"grad"``) of a parallel module at
    full single-device shape, keyed by the single-device module's names.

    Works on a ParallelDecoderLM or a ParallelNSAAttention. Collective over the TP group.
    """
    if what not in ("param", "grad"):
        raise ValueError(f"what must be 'param' or 'grad', got {what!r}")
    names, out, seen = _full_name_map(module), {}, set()
    g = state.tp_group
    p_size = C.group_size(g)
    for name, p in module.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        t = p if what == "param" else (p.grad if p.grad is not None else torch.zeros_like(p))
        shard = getattr(p, "nsa_shard", None)
        if shard is None or p_size == 1:
            out[names[name]] = t.detach().clone()
            continue
        dim, start, stop = shard
        parts = [torch.empty_like(t) for _ in range(p_size)]
        torch.distributed.all_gather(parts, t.contiguous(), group=g)
        bounds = torch.tensor([start, stop], device=t.device)  # NCCL gathers device tensors only
        all_bounds = [torch.empty_like(bounds) for _ in range(p_size)]
        torch.distributed.all_gather(all_bounds, bounds, group=g)
        size = max(int(b[1]) for b in all_bounds)
        full = t.new_zeros(t.shape[:dim] + (size,) + t.shape[dim + 1:])
        for part, b in zip(parts, all_bounds):
            full.narrow(dim, int(b[0]), int(b[1] - b[0])).copy_(part)
        out[names[name]] = full
    return out

"""The layout record: a checkpoint written by the parallel twin classes (other names, other
order) loads into the in-place sharded model by name and slice, and the optimizer's
parameters come in the checkpoint's order, so Adam's state lands on the right parameter."""
import pytest
import torch
from torch import nn

from nsa_dist.checkpoint.layout import (local_layout, local_slices, ordered_parameters, rename_state_dict,
                                        renames)


class Old(nn.Module):
    """Like a twin class of today: bare parameters under their own names, a map to full names,
    registered in another order; rank 1 of TP=2 (rows 2:4 of q, columns 2:4 of o)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.q_proj = nn.Parameter(torch.randn(2, 4))
        self.o_proj = nn.Parameter(torch.randn(4, 2))
        self.gate_fc1_b = nn.Parameter(torch.randn(4))
        self.q_proj.nsa_shard, self.o_proj.nsa_shard = (0, 2, 4), (1, 2, 4)

    FULL = {"embed.weight": "embed.weight", "q_proj": "attn.q_proj.weight",
            "o_proj": "attn.o_proj.weight", "gate_fc1_b": "attn.gate.fc1.bias"}


def old_layout(old: Old) -> dict:
    """The record such a model's checkpoint holds (its twin names mapped to full names)."""
    return {name: [Old.FULL[name], *entry[1:]] for name, entry in local_layout(old).items()}


class New(nn.Module):
    """The same rank after the change: single-device names, the model's registration order
    (o before q here), a tied LM head (a second name of the embedding)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.attn = nn.Module()
        self.attn.gate = nn.Module()
        self.attn.gate.fc1 = nn.Module()
        self.attn.gate.fc1.bias = nn.Parameter(torch.randn(4))
        self.attn.o_proj = nn.Linear(2, 4, bias=False)
        self.attn.q_proj = nn.Linear(4, 2, bias=False)
        self.lm_head = nn.Linear(4, 6, bias=False)
        self.lm_head.weight = self.embed.weight
        self.attn.q_proj.weight.nsa_shard, self.attn.o_proj.weight.nsa_shard = (0, 2, 4), (1, 2, 4)


def _groups(named):
    """The trainer's rule: a stable split of the given order into decay / no decay."""
    decay = [p for n, p in named if p.dim() >= 2 and "embed" not in n]
    return [{"params": decay, "weight_decay": 0.1},
            {"params": [p for n, p in named if not (p.dim() >= 2 and "embed" not in n)], "weight_decay": 0.0}]


def test_record_lists_each_parameter_once_in_the_given_order():
    new = New()
    assert list(local_layout(new)) == ["embed.weight", "attn.gate.fc1.bias", "attn.o_proj.weight",
                                       "attn.q_proj.weight"]  # the tied lm_head once
    order = [p for g in _groups(list(new.named_parameters())) for p in g["params"]]
    record = local_layout(new, order)
    assert list(record) == ["attn.o_proj.weight", "attn.q_proj.weight", "embed.weight", "attn.gate.fc1.bias"]
    assert record["attn.o_proj.weight"] == ["attn.o_proj.weight", 1, 2, 4]
    assert record["embed.weight"] == ["embed.weight", None, None, None]


def test_old_names_map_to_new_by_full_name_and_slice():
    old, new = old_layout(Old()), local_layout(New())
    assert old["q_proj"] == ["attn.q_proj.weight", 0, 2, 4]
    assert renames(old, new) == {"embed.weight": "embed.weight", "q_proj": "attn.q_proj.weight",
                                 "o_proj": "attn.o_proj.weight", "gate_fc1_b": "attn.gate.fc1.bias"}
    other_rank = dict(old, q_proj=["attn.q_proj.weight", 0, 0, 2])
    with pytest.raises(ValueError, match=r"q_proj \(slice \['attn.q_proj.weight', 0, 0, 2\]"):
        renames(other_rank, new, "ckpt")
    with pytest.raises(ValueError, match=r"parameters \['attn.gate.fc1.bias'\] are not in"):
        renames({k: v for k, v in old.items() if k != "gate_fc1_b"}, new)


def test_state_dict_renamed_and_tied_head_filled():
    old, new = Old(), New()
    state = rename_state_dict(old.state_dict(), renames(old_layout(old), local_layout(new)), new)
    new.load_state_dict(state, strict=True)
    assert torch.equal(new.attn.q_proj.weight, old.q_proj) and torch.equal(new.lm_head.weight, old.embed.weight)


def test_adam_state_follows_the_parameters_in_the_checkpoints_order():
    """One AdamW step on the old model; its optimizer state loads into the new model, whose
    groups are built in the record's order: every moment sits on its own parameter. Built in
    the new model's own order, the same load puts them elsewhere (the check can fail)."""
    torch.manual_seed(0)
    old, new = Old(), New()
    opt = torch.optim.AdamW(_groups(list(old.named_parameters())), lr=0.1)
    sum((p ** 2).sum() * (i + 1) for i, p in enumerate(old.parameters())).backward()
    opt.step()
    record = old_layout(old)  # what the twin classes' trainer recorded: registration order
    mapping = renames(record, local_layout(new))
    new.load_state_dict(rename_state_dict(old.state_dict(), mapping, new))
    want = {mapping[n]: opt.state[p]["exp_avg"] for n, p in old.named_parameters()}

    def moments(named):
        fresh = torch.optim.AdamW(_groups(named), lr=0.1)
        fresh.load_state_dict(opt.state_dict())
        return {n: fresh.state[p]["exp_avg"] for n, p in named}

    got = moments(ordered_parameters(new, record))
    assert [n for n, _ in ordered_parameters(new, record)] == [mapping[n] for n in record]
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    misplaced = moments(list(new.named_parameters()))  # the new model's own order
    assert not torch.equal(misplaced["attn.q_proj.weight"], want["attn.q_proj.weight"])


def test_local_slices_cut_full_tensors_for_this_rank():
    new = New()
    full = {"attn.q_proj.weight": torch.arange(16.).view(4, 4), "attn.o_proj.weight": torch.arange(16.).view(4, 4),
            "attn.gate.fc1.bias": torch.zeros(4), "embed.weight": torch.ones(6, 4)}
    cut = {id(p): t for p, t in local_slices(new, full, tied=True, where="x")}
    assert torch.equal(cut[id(new.attn.q_proj.weight)], full["attn.q_proj.weight"][2:4])
    assert torch.equal(cut[id(new.attn.o_proj.weight)], full["attn.o_proj.weight"][:, 2:4])
    with pytest.raises(ValueError, match="x: no tensor for parameter embed.weight"):
        local_slices(new, {k: v for k, v in full.items() if k != "embed.weight"}, tied=True, where="x")

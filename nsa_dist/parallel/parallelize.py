"""The parallel plan: shard a single-device NSADecoderLM in place (torchtitan style).

``parallelize(model, state, megatron_sp=False, comm_stats=None)`` replaces each parameter of
``model`` by the slice this rank holds, under the same name and in the same order, and sets
the layers' ``comm`` hooks (hooks.py); the model's own forward then runs the layout. The full
model is built from a seed on every rank first, so every layout starts from the same weights
as one device. Inputs are always the full sequence ``input_ids [B, S]`` (and labels,
cu_seqlens, position_ids): each rank takes its Ulysses shard itself. The loss is the global
mean over non-ignored labels, identical on every rank of the TP and Ulysses groups. Logits
stay split: ``[B, S_local, V/tp]``.

What is split (HQ query heads, H KV heads; ``HeadLayout`` says which ones this rank holds):
- column-parallel (output rows): ``q_proj``, every ``k_proj``/``v_proj`` (whole replicas
  when tp > H), the gate's last layer (3 rows per head), the MLP's ``gate_proj`` / ``up_proj``,
  the embedding and LM head (vocabulary rows);
- row-parallel (input columns): ``o_proj``, ``down_proj``;
- replicated: norms, the gate's first layer, phi.

Gradient contract: after ``loss.backward()`` every parameter's gradient is complete over
TP (replicated parameters already summed); over Ulysses and CP each rank holds its sequence
shard's part, summed by the data-parallel reduction over the sequence-data-parallel group
(DeepSpeed does this when given ``state.mpu()``; without DeepSpeed call ``sync_grads``).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ..models.decoder import DecoderBlock, NSADecoderLM
from ..modules.attention import NSAAttention
from ..modules.comm import AttentionComm, LMComm
from ..modules.dense import DenseAttention
from . import collectives as C
from .comm_stats import CommStats, Meter
from .hooks import SELECTION_COMM, AttentionPlanComm, LMPlanComm, TPRegion, sub
from .layers import replicate_, shard_, shard_columnwise_, shard_rowwise_
from .state import HeadLayout, ParallelState, check_model_layout

Attention = Union[NSAAttention, DenseAttention]


def parallelize(model: NSADecoderLM, state: ParallelState, megatron_sp: bool = False,
                comm_stats: Optional[CommStats] = None, selection_comm: str = "auto") -> NSADecoderLM:
    """Shard ``model`` IN PLACE for this rank and return it (the full weights are dropped).

    megatron_sp: shard norms/residuals along the sequence inside TP (needs sp=1).
    comm_stats: where collectives record their bytes (reset it every step).
    selection_comm: how ranks sharing a KV head agree on the selection when tp*sp > H
    ("importance" all-reduce, "gather_q", or "auto": the smaller; see hooks.py).
    Parameter names and order stay the single-device model's; ``num_parameters()`` and
    ``flops_per_token()`` still count the whole model, ``local_num_parameters()`` this rank's.

    Collective: every rank of the world must call it (it may create process groups).
    """
    if not isinstance(model, NSADecoderLM):
        raise TypeError(f"parallelize expects an NSADecoderLM, got {type(model).__name__}")
    if type(model.comm) is not LMComm:
        raise ValueError("the model is already parallelised: build a fresh NSADecoderLM for each layout")
    cfg = model.config
    check_model_layout(cfg.num_heads, cfg.num_kv_heads, state.tp, state.sp, cfg.vocab_size, None, megatron_sp)
    if megatron_sp and state.sp > 1:
        raise ValueError("megatron_sp=True needs sp=1 (Ulysses already shards the sequence)")
    if state.replica_size > 1 and state.tp_group is None:
        raise ValueError("tp*sp*cp > 1 needs process groups: initialise torch.distributed first")
    if cfg.ffn_size % state.tp:
        raise ValueError(f"MLP width {cfg.ffn_size} is not divisible by tp={state.tp}; set "
                         f"intermediate_size to a multiple of {state.tp}")
    _check_selection_comm(selection_comm)
    root = comm_stats.meter("") if comm_stats is not None else None
    tp, r = state.tp, state.tp_rank
    per = cfg.vocab_size // tp
    shard_(model.embed, "weight", 0, r * per, (r + 1) * per)
    for i, block in enumerate(model.layers):
        _plan_block(block, state, megatron_sp, sub(root, f"layers.{i}"), selection_comm)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    else:
        shard_(model.lm_head, "weight", 0, r * per, (r + 1) * per)
    replicate_(model)  # the final norm
    model.comm = LMPlanComm(state, megatron_sp, r * per, root)
    return model


def _plan_block(block: DecoderBlock, state: ParallelState, megatron_sp: bool, meter: Optional[Meter],
                selection_comm: str) -> None:
    """Attention by heads, the MLP by its inner width; norms replicated (their gradients
    summed over TP under Megatron SP, where each rank normalises a different sequence shard)."""
    parallelize_attention(block.attn, state, megatron_sp, sub(meter, "attn"), selection_comm)
    mlp, tp, r = block.mlp, state.tp, state.tp_rank
    per = mlp.gate_proj.weight.shape[0] // tp
    shard_columnwise_(mlp.gate_proj, r * per, (r + 1) * per)
    shard_columnwise_(mlp.up_proj, r * per, (r + 1) * per)
    shard_rowwise_(mlp.down_proj, r * per, (r + 1) * per)
    mm = sub(meter, "mlp")
    mlp.comm = TPRegion(state.tp_group, megatron_sp, mm, mm)
    replicate_(block)
    block.comm = TPRegion(state.tp_group, megatron_sp, shared_meter=sub(meter, "norm_grads"),
                          sum_shared=megatron_sp)


def parallelize_attention(attn: Attention, state: ParallelState, megatron_sp: bool = False,
                          meter: Optional[Meter] = None, selection_comm: str = "auto") -> Attention:
    """Shard one attention layer (NSA or the dense baseline) IN PLACE over ``state``'s TP
    and Ulysses groups and set its hooks; returns it. Its input and output are then
    [B, S/tp, hidden] shards of the TP group with ``megatron_sp`` (sp must be 1),
    [B, S/sp, hidden] shards of the Ulysses group with sp > 1, else [B, S, hidden] replicated
    over TP; ``cu_seqlens`` / ``position_ids`` always describe the full sequence."""
    _check_selection_comm(selection_comm)
    if type(attn.comm) is not AttentionComm:
        raise ValueError("the attention layer is already parallelised: build a fresh one for each layout")
    if megatron_sp and state.sp > 1:
        raise ValueError("Megatron sequence parallel together with Ulysses (sp > 1) is not "
                         "supported; use megatron_sp=False with sp > 1, or sp=1")
    if state.cp > 1:
        if not isinstance(attn, NSAAttention):
            raise ValueError(f"context parallel (cp={state.cp}) is implemented for NSA attention only, "
                             f"not {type(attn).__name__}: use cp=1 (TP / Ulysses) for the dense baseline")
    L = HeadLayout(attn.num_heads, attn.num_kv_heads, state.tp, state.sp, state.tp_rank, state.sp_rank)
    dk, dv = attn.head_dim, attn.v_head_dim
    shard_columnwise_(attn.q_proj, L.q_start * dk, (L.q_start + L.q_per_tp) * dk)
    for proj, d in ((attn.k_proj, dk), (attn.v_proj, dv)):
        for linear in (proj.values() if isinstance(proj, nn.ModuleDict) else [proj]):
            shard_columnwise_(linear, L.kv_start * d, (L.kv_start + L.kv_per_tp) * d)
            linear.weight.tensor_model_parallel = L.kv_first  # a replica counts once in norms
    if isinstance(attn, NSAAttention):
        shard_columnwise_(attn.gate.fc2, L.q_start * 3, (L.q_start + L.q_per_tp) * 3)
    shard_rowwise_(attn.o_proj, L.q_start * dv, (L.q_start + L.q_per_tp) * dv)
    replicate_(attn)  # gate.fc1 and phi: used for every head
    sel_block = attn.config.sel_block if isinstance(attn, NSAAttention) else 1
    attn.comm = AttentionPlanComm(L, state, megatron_sp, meter, selection_comm, sel_block, dk)
    return attn


# The name earlier versions gave the parallel attention (a class then; now the plan for one layer).
ParallelNSAAttention = parallelize_attention


def _check_selection_comm(selection_comm: str) -> None:
    if selection_comm not in SELECTION_COMM:
        raise ValueError(f"selection_comm must be 'auto', 'importance' or 'gather_q', got {selection_comm!r}")


# ---------------------------------------------------------------------- gradients and gathering
def sync_grads(model: nn.Module, state: ParallelState) -> None:
    """Without DeepSpeed: sum gradients over Ulysses and CP ranks and average over data
    parallel (one all-reduce over the sequence-data-parallel group, divided by dp)."""
    for p in model.parameters():
        if p.grad is not None and state.sp * state.cp * state.dp > 1:
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


@torch.no_grad()
def gather_full(module: nn.Module, state: ParallelState, what: str = "param") -> dict[str, torch.Tensor]:
    """Every parameter (``what="param"``) or gradient (``"grad"``) of a parallel module at
    full single-device shape, keyed by the single-device module's names.

    Works on a parallelised model or attention layer (its names are the single-device
    names). Collective over the TP group.
    """
    if what not in ("param", "grad"):
        raise ValueError(f"what must be 'param' or 'grad', got {what!r}")
    out, seen = {}, set()
    g = state.tp_group
    p_size = C.group_size(g)
    for name, p in module.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        t = p if what == "param" else (p.grad if p.grad is not None else torch.zeros_like(p))
        shard = getattr(p, "nsa_shard", None)
        if shard is None or p_size == 1:
            out[name] = t.detach().clone()
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
        out[name] = full
    return out

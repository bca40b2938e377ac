"""Dense causal attention with the same q/k/v/o projections: the baseline NSA is measured
against, on the fastest causal attention the machine has."""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .comm import AttentionComm, bound
from .rope import RotaryEmbedding, token_positions

# q [B, S, HQ, D], k, v [B, S, H, D], document bounds -> o [B, S, HQ, Dv]
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, list], torch.Tensor]


def sdpa_causal(backend: Optional[str] = None, expand_kv: bool = False) -> Attend:
    """SDPA over each document [a, b) of ``bounds``: only ``backend`` ("cudnn", "flash",
    "efficient", "math") may run, or SDPA's own choice when None. ``expand_kv``: repeat the KV
    heads to the query heads instead of asking the backend to group them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    only = None if backend is None else getattr(SDPBackend, SDPA_NAMES[backend])

    def run(q, k, v, bounds):
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, S, D]
        if expand_kv:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        with sdpa_kernel([only]) if only is not None else contextlib.nullcontext():
            outs = [F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True,
                                                   enable_gqa=not expand_kv)
                    for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        # one document (every sequence whole): SDPA's output as it is (a cat of one tensor
        # copies it, into a layout that o_proj's input then copies again)
        return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)).transpose(1, 2)
    return run


SDPA_NAMES = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
              "math": "MATH"}


def flash_attn_causal(varlen: Callable) -> Attend:
    """flash-attn's ``flash_attn_varlen_func``: every document in one call."""
    def run(q, k, v, bounds):
        B, S = q.shape[:2]
        if B > 1:  # B sequences (no packed documents): B documents of S tokens
            bounds = [i * S for i in range(B + 1)]
        cu = torch.tensor(bounds, dtype=torch.int32, device=q.device)
        longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        o = varlen(q.reshape(B * S, *q.shape[2:]), k.reshape(B * S, *k.shape[2:]), v.reshape(B * S, *v.shape[2:]),
                   cu, cu, longest, longest, causal=True)
        return o.view(B, S, *o.shape[1:])
    return run


def _cuda_time(run: Callable[[], None]) -> float:
    """Milliseconds of one call of ``run`` (one warm-up, mean of three)."""
    run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 3


class CausalAttention:
    """Runs causal attention (q [B, S, HQ, D], k, v [B, S, H, D], documents) on the fastest
    implementation the machine has, picked once per shape.

    CPU: SDPA's own choice (its math or CPU flash kernel). CUDA: the candidates that run on
    the inputs (flash-attn's ``flash_attn_varlen_func`` when the package imports, fp16/bf16,
    Dk = Dv; SDPA limited to cuDNN, with the KV heads expanded when cuDNN cannot group them;
    to flash; to memory-efficient) are timed forward + backward on the first call of a shape
    (dtype, heads, head dims, longest document rounded up to a power of two) and the fastest is
    kept. ``chosen`` maps each shape to its pick, ``last`` names what the last call ran (a
    benchmark prints them). One object serves every dense layer of a model.
    """

    def __init__(self, timer: Callable[[Callable[[], None]], float] = _cuda_time):
        self.chosen: dict[tuple, str] = {}
        self.last: Optional[str] = None
        self.timer = timer
        self.picking = False  # inside _pick
        self._varlen: Optional[Callable] = None  # flash-attn's function once imported
        self._varlen_missing = False

    def candidates(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, Attend]:
        """Name -> implementation of what may run on these inputs."""
        if not q.is_cuda:
            return {"sdpa": sdpa_causal()}
        out = {}
        if q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] == v.shape[-1] and self._flash_attn():
            out["flash_attn"] = flash_attn_causal(self._varlen)
        out["sdpa_cudnn"] = sdpa_causal("cudnn")
        if q.shape[2] != k.shape[2]:  # GQA: cuDNN may need the KV heads repeated
            out["sdpa_cudnn_expanded"] = sdpa_causal("cudnn", expand_kv=True)
        out.update(sdpa_flash=sdpa_causal("flash"), sdpa_efficient=sdpa_causal("efficient"))
        return out

    def _flash_attn(self) -> bool:
        if self._varlen is None and not self._varlen_missing:
            try:
                from flash_attn import flash_attn_varlen_func
                self._varlen = flash_attn_varlen_func
            except ImportError:
                self._varlen_missing = True
        return self._varlen is not None

    def __call__(self, q, k, v, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q [B, S, HQ, D], k, v [B, S, H, D] -> o [B, S, HQ, Dv], causal within each document."""
        S = q.shape[1]
        bounds = [0, S] if cu_seqlens is None else [int(b) for b in cu_seqlens.tolist()]
        longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        key = (q.device.type, q.dtype, q.shape[2], k.shape[2], q.shape[3], v.shape[3], 1 << (longest - 1).bit_length())
        runs = self.candidates(q, k, v)
        if key not in self.chosen:
            self.chosen[key] = next(iter(runs)) if len(runs) == 1 else self._pick(runs, q, k, v, bounds)
        self.last = self.chosen[key]
        return runs[self.last](q, k, v, bounds)

    def _pick(self, runs: dict[str, Attend], q, k, v, bounds) -> str:
        """The fastest candidate, forward + backward on detached copies of the inputs (under
        identity saved-tensor hooks, so an enclosing activation checkpoint is not involved;
        ``picking`` tells a selective checkpoint's policy to keep none of these results)."""
        times, refused = {}, {}
        self.picking = True
        try:
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                ins = [t.detach().clone().requires_grad_() for t in (q, k, v)]
                for name, run in runs.items():
                    # a backend that cannot take these inputs says why in UserWarnings before it
                    # raises: kept for the error below, not printed (six per dense bench point);
                    # a warning torch gives once per process, if given here, is not seen later
                    with warnings.catch_warnings(record=True) as said:
                        warnings.simplefilter("always", UserWarning)
                        try:
                            times[name] = self.timer(lambda: run(*ins, bounds).sum().backward())
                        except RuntimeError as err:  # this backend does not take these inputs
                            why = [str(w.message).split(" (Triggered")[0] for w in said] + [str(err)]
                            refused[name] = "; ".join(dict.fromkeys(why))
        finally:
            self.picking = False
        if not times:
            raise RuntimeError(f"no causal attention implementation runs on q {tuple(q.shape)} {q.dtype}, "
                               f"k {tuple(k.shape)}, v {tuple(v.shape)}: "
                               + " | ".join(f"{n}: {w}" for n, w in refused.items()))
        return min(times, key=times.get)


# SDPA's fused kernels: one op each, whose outputs (o and its log-sum-exp) a selective
# activation checkpoint can keep while it recomputes q, k and v
_SDPA_OPS = ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu")


def keep_attention_outputs(kernel: CausalAttention):
    """``context_fn`` of ``torch.utils.checkpoint.checkpoint`` (non-reentrant): the region is
    recomputed in the backward except SDPA's fused attention ops, whose outputs are kept from
    the forward (not the ones ``kernel`` runs while it times its candidates)."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    keep = {getattr(torch.ops.aten, n).default for n in _SDPA_OPS if hasattr(torch.ops.aten, n)}

    def policy(ctx, op, *args, **kwargs):
        if op in keep and not kernel.picking:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE
    return create_selective_checkpoint_contexts(policy)


class DenseAttention(nn.Module):
    """Causal GQA attention through the fastest implementation the machine has
    (``CausalAttention``: flash-attn or one of SDPA's backends, timed once per shape on CUDA).

    x: [B, S, hidden] -> (y [B, S, hidden], None). Packed documents (cu_seqlens, B = 1): nothing
    crosses a boundary. ``self.comm`` holds a parallel plan's hooks, as in NSAAttention.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 v_head_dim: int = 0, rope_theta: float = 10000.0, fused_projection: bool = True,
                 kernel: Optional["CausalAttention"] = None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.v_head_dim = head_dim, v_head_dim or head_dim
        self.fused_projection = fused_projection
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.v_head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.v_head_dim, hidden_size, bias=False)
        self.rope = RotaryEmbedding(head_dim, rope_theta)
        self.comm = AttentionComm()
        self.kernel = kernel or CausalAttention()  # shared by a model's dense layers

    def prepare(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """x [B, S_in, hidden] -> q [B, S, HQ', D], k, v [B, S, H', D] (RoPE on q and k; this
        rank's heads, the whole sequence) and "positions". Fused: one GEMM for q, k and v."""
        c = self.comm
        x = c.enter(x)
        B, S_l, _ = x.shape
        dk = self.head_dim
        positions = token_positions(c.seq_len(S_l), x.device, cu_seqlens, position_ids)
        cos, sin = self.rope.cos_sin(c.local_positions(positions), x.dtype)
        wk, wv = c.kv_weights(self.k_proj.weight, self.v_proj.weight)
        if self.fused_projection:
            nq, nk = self.q_proj.weight.shape[0], wk.shape[0]
            # one split: its backward is one cat (slices would each write a zero tensor of y's size)
            qk, v = F.linear(x, torch.cat([self.q_proj.weight, wk, wv])).split([nq + nk, wv.shape[0]], dim=-1)
            qk = self.rope.rotate(qk.unflatten(-1, (-1, dk)), cos, sin)
            q, k = qk.split([nq // dk, nk // dk], dim=2)
        else:
            q = self.rope.rotate(self.q_proj(x).unflatten(-1, (-1, dk)), cos, sin)
            k = self.rope.rotate(bound(self.k_proj, [wk])(x).unflatten(-1, (-1, dk)), cos, sin)
            v = bound(self.v_proj, [wv])(x)
        return {"q": c.to_heads(q), "k": c.to_heads(k, kv=True),
                "v": c.to_heads(v.unflatten(-1, (-1, self.v_head_dim)), kv=True), "positions": positions}

    def keeps_outputs(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether ``recompute: keep_attention`` keeps only the attention's output and
        log-sum-exp (a selective checkpoint of the whole block, ``keep_attention_outputs``):
        where SDPA runs; flash-attn's function is not one of the ops it keeps."""
        return not self.kernel._flash_attn() if torch.device(device).type == "cuda" else True

    def kept_bytes(self, batch: int, seq_in: int, dtype: torch.dtype, device=None) -> int:
        """Bytes ``recompute: keep_attention`` keeps for one call on x [batch, seq_in, hidden]
        (this rank's heads). Selective checkpoint (``keeps_outputs`` on ``device``): o in
        ``dtype`` and the fp32 log-sum-exp. Else: q, k, v, o, K/V repeated to every query head
        (cuDNN's SDPA cannot always group them: ``CausalAttention``) and the log-sum-exp."""
        hq = self.q_proj.weight.shape[0] // self.head_dim
        h = max(1, hq // (self.num_heads // self.num_kv_heads))
        el = dtype.itemsize
        if device is not None and self.keeps_outputs(device, dtype):
            per = el * hq * self.v_head_dim + 4 * hq
        else:
            per = el * (2 * hq + h) * (self.head_dim + self.v_head_dim) + 4 * hq
        return batch * self.comm.seq_len(seq_in) * per

    def attend(self, p: dict[str, torch.Tensor], cu_seqlens: Optional[torch.Tensor] = None):
        """Causal attention within each document: (o [B, S, HQ', Dv], None)."""
        return self.kernel(p["q"], p["k"], p["v"], cu_seqlens), None

    def finish(self, o: torch.Tensor) -> torch.Tensor:
        """o [B, S, HQ', Dv] -> y [B, S_in, hidden]."""
        return self.comm.exit(self.o_proj(self.comm.from_heads(o).flatten(2)))

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, return_stats: bool = False, **_):
        """x [B, S_in, hidden] -> (y [B, S_in, hidden], None)."""
        o, _ = self.attend(self.prepare(x, cu_seqlens, position_ids), cu_seqlens)
        return self.finish(o), None

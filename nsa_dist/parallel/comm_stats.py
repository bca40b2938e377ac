"""Communication accounting: bytes moved per collective, per layer, per step.

Every collective in ``collectives.py`` takes an optional ``Meter`` (a ``CommStats`` plus a
tag naming the layer). Two numbers are kept per call:

- payload: bytes of the full logical tensor (all-gather output, reduce-scatter input,
  all-reduce / all-to-all buffer);
- wire: bytes each rank sends with the bandwidth-optimal (ring / pairwise) algorithm:
  all-reduce ``2 (p-1)/p * n``, all-gather and reduce-scatter ``(p-1)/p * n``,
  all-to-all ``(p-1)/p * n``. Wire bytes divided by the bus bandwidth give the time.

The object is owned by whoever runs the step (the trainer), passed to ``parallelize`` and
reset every step; nothing is global.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch

WIRE_FACTOR = {
    "all_reduce": lambda p: 2.0 * (p - 1) / p,
    "all_gather": lambda p: (p - 1) / p,
    "reduce_scatter": lambda p: (p - 1) / p,
    "all_to_all": lambda p: (p - 1) / p,
}


def wire_bytes(op: str, payload_bytes: int, group_size: int) -> float:
    """Bytes one rank sends for a collective of ``payload_bytes`` over ``group_size`` ranks."""
    if group_size <= 1:
        return 0.0
    return WIRE_FACTOR[op](group_size) * payload_bytes


class CommStats:
    """Accumulates (tag, op, phase) -> calls, payload bytes, wire bytes.

    phase is "fwd" or "bwd". ``reset()`` between steps; ``scalars()`` gives a flat dict
    for TensorBoard (``comm/<tag>/<op>_<phase>_MB``).
    """

    def __init__(self):
        self._rec: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0, 0, 0.0])
        self.enabled = True

    def meter(self, tag: str) -> "Meter":
        return Meter(self, tag)

    def record(self, tag: str, op: str, phase: str, payload_bytes: int, group_size: int) -> None:
        if not self.enabled or group_size <= 1:
            return
        r = self._rec[(tag, op, phase)]
        r[0] += 1
        r[1] += payload_bytes
        r[2] += wire_bytes(op, payload_bytes, group_size)

    def reset(self) -> None:
        self._rec.clear()

    def rows(self) -> list[dict]:
        """One dict per (tag, op, phase): calls, payload_bytes, wire_bytes."""
        return [dict(tag=t, op=o, phase=p, calls=int(v[0]), payload_bytes=int(v[1]), wire_bytes=v[2])
                for (t, o, p), v in sorted(self._rec.items())]

    def total(self, key: str = "wire_bytes", tag_prefix: str = "", op: Optional[str] = None) -> float:
        return sum(r[key] for r in self.rows()
                   if r["tag"].startswith(tag_prefix) and (op is None or r["op"] == op))

    def per_tag(self, key: str = "wire_bytes") -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for r in self.rows():
            out[r["tag"]] += r[key]
        return dict(out)

    def scalars(self) -> dict[str, float]:
        """Flat metrics (MB of wire traffic per rank) for a logger."""
        out = {f"comm/{r['tag']}/{r['op']}_{r['phase']}_MB": r["wire_bytes"] / 2**20 for r in self.rows()}
        out["comm/total_MB"] = self.total() / 2**20
        return out

    def table(self) -> str:
        lines = [f"{'tag':<28}{'op':<16}{'phase':<6}{'calls':>6}{'payload MiB':>14}{'wire MiB':>12}"]
        for r in self.rows():
            lines.append(f"{r['tag']:<28}{r['op']:<16}{r['phase']:<6}{r['calls']:>6}"
                         f"{r['payload_bytes'] / 2**20:>14.3f}{r['wire_bytes'] / 2**20:>12.3f}")
        lines.append(f"{'total':<56}{self.total('payload_bytes') / 2**20:>14.3f}"
                     f"{self.total() / 2**20:>12.3f}")
        return "\n".join(lines)


class Meter:
    """A CommStats bound to one tag (a layer name); passed to collectives."""

    __slots__ = ("stats", "tag")

    def __init__(self, stats: CommStats, tag: str):
        self.stats, self.tag = stats, tag

    def __call__(self, op: str, phase: str, t: torch.Tensor, group_size: int) -> None:
        self.stats.record(self.tag, op, phase, t.numel() * t.element_size(), group_size)

    def sub(self, name: str) -> "Meter":
        return Meter(self.stats, f"{self.tag}.{name}" if self.tag else name)


# ----------------------------------------------------------------------------- analytic model
def layer_traffic(cfg, B: int, S: int, tp: int = 1, sp: int = 1, megatron_sp: bool = False,
                  act_bytes: int = 2, param_bytes: int = 4, selection_comm: str = "auto",
                  cp: int = 1) -> list[dict]:
    """Collectives one decoder layer issues per training step (forward + backward), as
    recorded by CommStats for an unpacked batch: dicts of component (the meter tag under
    ``layers.<i>.``), op, phase, payload_bytes and group size. ``cfg``: ModelConfig.

    Activations in ``act_bytes`` (2 for bf16), gradients of replicated parameters in
    ``param_bytes`` (fp32 master gradients). ``selection_comm`` as in ``parallelize``.
    ``cp``: context parallel degree (each rank's S/cp tokens; K/V all-gathered, "attn.cp_kv").
    The tests check it against recorded traffic.
    """
    n = cfg.nsa
    h, HQ, H, dk, dv = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.dv
    P = tp * sp
    S_q = S // cp  # the queries (and tokens) of one CP rank
    S_l = S_q // sp
    kv_tp = H // tp if tp <= H else 1
    kv_sent = max(kv_tp, sp)  # KV heads per TP rank after the Ulysses repeat
    kv_proj = 1 if n.shared_kv else 3  # distinct K/V projections (one shared by every branch)
    Ns = -(-S // n.sel_block)
    out = []

    def add(comp, op, phase, payload, group):
        if group > 1 and payload:
            out.append(dict(component=comp, op=op, phase=phase, payload_bytes=int(payload), group=group))

    act = B * S_l * h * act_bytes
    if tp > 1:
        if megatron_sp:
            full = B * S_q * h * act_bytes
            for comp in ("attn.sp_gather", "mlp"):
                add(comp, "all_gather", "fwd", full, tp)
                add(comp, "reduce_scatter", "bwd", full, tp)
            for comp in ("attn.sp_reduce_scatter", "mlp"):
                add(comp, "reduce_scatter", "fwd", full, tp)
                add(comp, "all_gather", "bwd", full, tp)
            add("norm_grads", "all_reduce", "bwd", 2 * h * param_bytes, tp)
        else:
            add("attn.tp_input", "all_reduce", "bwd", act, tp)
            add("attn.tp_output", "all_reduce", "fwd", act, tp)
            add("mlp", "all_reduce", "bwd", act, tp)
            add("mlp", "all_reduce", "fwd", act, tp)
        gh = n.gate_hidden or max(16, h // 4)
        rep = h * gh + gh
        if n.phi == "mlp":
            for d in (dk, dv):
                ph = n.phi_hidden or max(d, n.cmp_block * d // 4)
                rep += n.cmp_block * d + (n.cmp_block * d * ph + ph) + (ph * d + d)
        add("attn.replicated_grads", "all_reduce", "bwd", rep * param_bytes, tp)
        if tp > H:
            add("attn.kv_replica_grads", "all_reduce", "bwd", kv_proj * h * (dk + dv) * param_bytes, tp // H)
    if sp > 1:
        q_tp = HQ // tp
        per_dir = B * S_l * (q_tp * (dk + 3 + dv) + kv_proj * kv_sent * (dk + dv)) * act_bytes
        add("attn.ulysses", "all_to_all", "fwd", per_dir, sp)
        add("attn.ulysses", "all_to_all", "bwd", per_dir, sp)
    if cp > 1:  # every branch's K and V, the rank's KV heads, the whole sequence
        kv_local = kv_sent // sp
        gathered = kv_proj * B * S * kv_local * (dk + dv) * act_bytes
        add("attn.cp_kv", "all_gather", "fwd", gathered, cp)
        add("attn.cp_kv", "reduce_scatter", "bwd", gathered, cp)
    if P > H:
        G = HQ // H
        mode = selection_comm
        if mode == "auto":  # the rule of hooks.AttentionPlanComm.selection_mode
            mode = "gather_q" if G * dk * act_bytes < 2 * Ns * 8 else "importance"
        if mode == "gather_q":
            add("attn.selection_q", "all_gather", "fwd", B * S_q * G * dk * act_bytes, P // H)
        else:
            add("attn.importance", "all_reduce", "fwd", B * S_q * 1 * Ns * 8, P // H)
    return out


def payload_by(rows: list[dict], key) -> dict:
    """Payload bytes summed per ``key(row)`` (rows of ``layer_traffic`` or ``CommStats.rows``;
    rows whose key is None are left out): for comparing recorded traffic with the formula."""
    out: dict = {}
    for r in rows:
        k = key(r)
        if k is not None:
            out[k] = out.get(k, 0) + r["payload_bytes"]
    return out


def summarize(rows: list[dict]) -> tuple[float, float]:
    """(payload bytes, wire bytes per rank) of a list of layer_traffic rows."""
    return (sum(r["payload_bytes"] for r in rows),
            sum(wire_bytes(r["op"], r["payload_bytes"], r["group"]) for r in rows))

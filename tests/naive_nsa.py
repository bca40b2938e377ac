"""A deliberately naive NSA (one query at a time, plain loops), written from SPEC.md alone.

It shares no code with nsa_dist.ops, so agreement between the two checks the reference
against the contract rather than against itself. Tiny shapes only.
"""
import math

import torch


def naive_nc(S, l, d):
    return 0 if S < l else (S - l) // d + 1


def naive_select(q, k_cmp, cfg, scale=None):
    """q [B,S,HQ,Dk], k_cmp [B,Nc,H,Dk] -> (indices [B,S,H,n] list form, p_cmp per query)."""
    B, S, HQ, Dk = q.shape
    H = k_cmp.shape[2]
    G = HQ // H
    l, d, ls, n = cfg.cmp_block, cfg.cmp_stride, cfg.sel_block, cfg.num_selected
    scale = Dk ** -0.5 if scale is None else scale
    Nc = k_cmp.shape[1]
    Ns = math.ceil(S / ls)
    out = torch.full((B, S, H, n), -1, dtype=torch.long)
    for b in range(B):
        for t in range(S):
            vis = [i for i in range(Nc) if i * d + l - 1 <= t]
            for h in range(H):
                imp = [0.0] * Ns
                for g in range(h * G, (h + 1) * G):
                    if vis:
                        s = torch.stack([q[b, t, g].double() @ k_cmp[b, i, h].double() * scale for i in vis])
                        p = torch.softmax(s, 0)
                        for pi, i in zip(p.tolist(), vis):
                            for j in range(Ns):
                                ov = max(0, min(i * d + l, (j + 1) * ls) - max(i * d, j * ls))
                                imp[j] += ov / d * pi
                cand = [j for j in range(Ns) if j * ls <= t]
                cur = t // ls
                forced = [j for j in cand if j in (0, cur, cur - 1)]
                rest = sorted((j for j in cand if j not in forced), key=lambda j: (-imp[j], j))
                chosen = sorted(forced + rest[: n - len(forced)])
                out[b, t, h, : len(chosen)] = torch.tensor(chosen)
    return out


def _attend(qv, keys, values, scale):
    s = torch.stack([qv @ k for k in keys]) * scale
    p = torch.softmax(s, 0)
    return sum(pi * v for pi, v in zip(p, values))


def naive_nsa(q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates, cfg, scale=None, indices=None):
    """Output [B,S,HQ,Dv] in float64, straight from SPEC."""
    q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates = (
        t.double() for t in (q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates))
    B, S, HQ, Dk = q.shape
    H, Dv = k_sel.shape[2], v_sel.shape[3]
    G = HQ // H
    l, d, ls, w = cfg.cmp_block, cfg.cmp_stride, cfg.sel_block, cfg.window
    scale = Dk ** -0.5 if scale is None else scale
    if indices is None:
        indices = naive_select(q, k_cmp, cfg, scale)
    out = torch.zeros(B, S, HQ, Dv, dtype=torch.float64)
    for b in range(B):
        for t in range(S):
            vis = [i for i in range(k_cmp.shape[1]) if i * d + l - 1 <= t]
            for g in range(HQ):
                h = g // G
                qv = q[b, t, g]
                zero = torch.zeros(Dv, dtype=torch.float64)
                o_cmp = _attend(qv, [k_cmp[b, i, h] for i in vis], [v_cmp[b, i, h] for i in vis], scale) if vis else zero
                pos = sorted({p for j in indices[b, t, h].tolist() if j >= 0
                              for p in range(j * ls, min((j + 1) * ls, S)) if p <= t})
                o_sel = _attend(qv, [k_sel[b, p, h] for p in pos], [v_sel[b, p, h] for p in pos], scale)
                if w > 0:
                    wp = range(max(0, t - w + 1), t + 1)
                    o_win = _attend(qv, [k_win[b, p, h] for p in wp], [v_win[b, p, h] for p in wp], scale)
                else:
                    o_win = zero
                gt = gates[b, t, g]
                out[b, t, g] = gt[0] * o_cmp + gt[1] * o_sel + gt[2] * o_win
    return out

"""Random inputs for the NSA function, shared by the reference and kernel tests."""
import torch

from nsa_dist.ops import compress


def random_nsa_inputs(cfg, B=1, S=64, HQ=4, H=2, Dk=16, Dv=None, dtype=torch.float32, seed=0,
                      device="cpu", cu_seqlens=None, requires_grad=False):
    """Returns dict q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates (+ raw k/v before compression)."""
    Dv = Dv or Dk
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    raw_k, raw_v = r(B, S, H, Dk), r(B, S, H, Dv)
    x = {
        "q": r(B, S, HQ, Dk),
        "k_cmp": compress(raw_k, cfg, cu_seqlens=cu_seqlens),
        "v_cmp": compress(raw_v, cfg, cu_seqlens=cu_seqlens),
        "k_sel": r(B, S, H, Dk), "v_sel": r(B, S, H, Dv),
        "k_win": r(B, S, H, Dk), "v_win": r(B, S, H, Dv),
        "gates": torch.rand(B, S, HQ, 3, generator=gen, dtype=torch.float64),
    }
    return {k: v.to(device=device, dtype=dtype).requires_grad_(requires_grad) for k, v in x.items()}


ARG_ORDER = ("q", "k_cmp", "v_cmp", "k_sel", "v_sel", "k_win", "v_win", "gates")


def args(x):
    return tuple(x[k] for k in ARG_ORDER)

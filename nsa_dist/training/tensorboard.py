"""TensorBoard logging: scalars, per-layer NSA statistics and selected-block images.

``torch.utils.tensorboard`` (and so the ``tensorboard`` package) is imported only when the
first writer is made; matplotlib, if importable, draws the block images, otherwise they are
plain uint8 arrays. Tags written (see ``BRANCHES``)::

    train/loss, train/lr, train/grad_norm, eval/loss
    perf/tokens_per_s_per_gpu, perf/tflops_per_gpu, perf/mfu, mem/<name>
    nsa/layer<i>/gate_mean_<branch>, nsa/layer<i>/gate_std_<branch>,
    nsa/layer<i>/tokens_read_<branch>       (branch in cmp, sel, win)
    nsa/selected_blocks/layer<i>            image: query position (rows) x block (columns)
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

BRANCHES = ("cmp", "sel", "win")


def _summary_writer(log_dir: str, purge_step: Optional[int] = None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError("TensorBoard logging needs the 'tensorboard' package: pip install "
                          "tensorboard (or set tensorboard: false in the train YAML)") from err
    return SummaryWriter(log_dir=log_dir, purge_step=purge_step)


def selected_blocks_image(selected: torch.Tensor, sel_block: int, max_rows: int = 1024,
                          min_width: int = 256) -> np.ndarray:
    """selected [S, n] block ids (-1 padded) -> uint8 image [rows, cols].

    White: a selected block; grey: a causally visible block that was not selected; black:
    the future. Rows are query positions (subsampled to ``max_rows``), columns blocks
    (each repeated so the image is at least ``min_width`` wide).
    """
    sel = selected.detach().to("cpu", torch.long)
    S = sel.shape[0]
    num_blocks = max(int(sel.max().item()) + 1 if sel.numel() else 1, (S + sel_block - 1) // sel_block, 1)
    img = np.zeros((S, num_blocks), dtype=np.uint8)
    own = np.arange(S) // sel_block
    img[np.arange(num_blocks)[None, :] <= own[:, None]] = 70
    rows, cols = np.nonzero(sel.numpy() >= 0)
    img[rows, sel.numpy()[rows, cols]] = 255
    if S > max_rows:
        img = img[:: (S + max_rows - 1) // max_rows]
    repeat = max(1, min_width // num_blocks)
    return np.repeat(img, repeat, axis=1)


class TBLogger:
    """Thin wrapper over SummaryWriter that does nothing when disabled (other ranks).
    purge_step: a resumed run's first new step; TensorBoard drops the events an earlier
    attempt wrote at that step or later (they are written again)."""

    def __init__(self, log_dir: str, enabled: bool = True, purge_step: Optional[int] = None):
        self.log_dir = log_dir
        self.writer = _summary_writer(log_dir, purge_step) if enabled else None

    def scalars(self, values: dict[str, Optional[float]], step: int) -> None:
        """Write each ``tag -> value`` (None values are skipped)."""
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, float(value), step)

    def attention_stats(self, stats: Sequence, step: int) -> None:
        """Per layer: gate mean/std and tokens read of each branch (AttentionStats list)."""
        if self.writer is None or not stats:
            return
        for i, st in enumerate(stats):
            for b, name in enumerate(BRANCHES):
                self.writer.add_scalar(f"nsa/layer{i}/gate_mean_{name}", float(st.gate_mean[b]), step)
                self.writer.add_scalar(f"nsa/layer{i}/gate_std_{name}", float(st.gate_std[b]), step)
                self.writer.add_scalar(f"nsa/layer{i}/tokens_read_{name}", float(st.tokens_read[b]), step)

    def blocks_image(self, selected: torch.Tensor, sel_block: int, layer: int, step: int) -> None:
        """Image of the selected blocks of one layer (KV head 0 of the first sample)."""
        if self.writer is None:
            return
        img = selected_blocks_image(selected, sel_block)
        tag = f"nsa/selected_blocks/layer{layer}"
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            self.writer.add_image(tag, img, step, dataformats="HW")
            return
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.imshow(img, aspect="auto", cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_xlabel("key block (repeated columns)")
        ax.set_ylabel("query position")
        ax.set_title(f"layer {layer}: selected blocks, step {step}")
        self.writer.add_figure(tag, fig, step, close=True)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

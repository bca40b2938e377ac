"""Progress line of rank 0 (step, loss, tokens/s, ETA) and rank-aware printing.

On a terminal the line redraws in place; in a log file (the launchers' usual output)
one line is printed per update. Other ranks print nothing unless ``log_all_ranks``.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Prints ``[####....] step 12/100 loss 5.12 tok/s 2,310 ETA 01:23`` on rank 0."""

    def __init__(self, total_steps: int, rank: int, log_all_ranks: bool = False,
                 stream: Optional[TextIO] = None, width: int = 24):
        self.total, self.rank, self.width = total_steps, rank, width
        self.active = rank == 0 or log_all_ranks
        self.prefix = f"[rank {rank}] " if log_all_ranks else ""
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start_time: Optional[float] = None
        self.start_step = 0
        self._open_line = False

    def start(self, step: int) -> None:
        self.start_time, self.start_step = time.perf_counter(), step

    def update(self, step: int, loss: float, tokens_per_s: float, extra: str = "") -> None:
        """``step`` optimizer steps done; ``tokens_per_s`` of this rank."""
        if not self.active:
            return
        elapsed = time.perf_counter() - (self.start_time or time.perf_counter())
        done = step - self.start_step
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        filled = int(self.width * step / max(1, self.total))
        bar = "#" * filled + "." * (self.width - filled)
        line = (f"{self.prefix}[{bar}] step {step}/{self.total} loss {loss:.4f} "
                f"tok/s {tokens_per_s:,.0f} ETA {format_duration(eta)}{extra}")
        if self.tty:
            self.stream.write("\r" + line)
            self._open_line = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def print(self, message: str) -> None:
        """A message line (never overwritten by the bar)."""
        if not self.active:
            return
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False
        self.stream.write(f"{self.prefix}{message}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.active and self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False

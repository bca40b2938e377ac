"""Stopping on a signal: SIGTERM (Slurm, torchrun, ``kill``), SIGUSR1 (``sbatch --signal``) and
SIGINT (Ctrl-C) ask the run to stop; every rank finishes the step it is in, a checkpoint of
that step is written, and the process exits with ``EXIT_PREEMPTED`` (75).

The first signal only sets a flag (the loop reads it once per step, folded into the all-reduce
of the loss, so all ranks stop after the same step even when only one got the signal) and
puts the default actions back: a second signal ends the process at once, even while it waits
inside a collective, where no Python handler would run.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    """Installs the handlers (main thread only) and remembers the first stop signal."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a signal on another rank"

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        for sig in STOP_SIGNALS:  # a second signal: the default action, at once
            signal.signal(sig, signal.SIG_DFL)
        # os.write: safe inside a handler (print may be interrupted mid-write)
        os.write(2, f"[stop] {signal.Signals(signum).name}: finishing this step, saving a checkpoint, "
                    f"then exiting with status 75; a second signal exits at once\n".encode())

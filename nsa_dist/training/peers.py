"""Naming the rank that a failed collective waited for.

When a collective fails (a peer was killed: its connections close; a peer hangs: the
``collective_timeout_s`` runs out), each surviving rank checks in under ``nsa_alive/<rank>``
in the process group's store and waits a few seconds for the others; the ranks that never
check in are the dead or frozen ones. Errors that do not come from the communication
backend are left alone (a bug on this rank is not a lost peer).
"""
from __future__ import annotations

import time
from typing import Optional

import torch.distributed as dist

# Words of gloo / NCCL / store errors about a peer that went away or did not answer.
_COMM_WORDS = ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket", "broken pipe")


def is_comm_failure(err: BaseException) -> bool:
    if isinstance(err, getattr(dist, "DistBackendError", ())) or isinstance(err, getattr(dist, "DistError", ())):
        return True
    return isinstance(err, RuntimeError) and any(w in str(err).lower() for w in _COMM_WORDS)


def missing_ranks(rank: int, world_size: int, wait_s: float = 10.0) -> Optional[list[int]]:
    """Ranks that did not check in within ``wait_s`` after this one did; None when the store
    itself is unreachable (its host, rank 0's node or the launcher, is gone)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"nsa_alive/{rank}", "1")
        deadline = time.monotonic() + wait_s
        while True:
            missing = [r for r in range(world_size) if not store.check([f"nsa_alive/{r}"])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.2)
    except Exception:  # noqa: BLE001 - any store error means the store is gone
        return None


def lost_peer_message(err: BaseException, rank: int, world_size: int, timeout_s: float,
                      wait_s: float = 10.0) -> Optional[str]:
    """What to tell the user when ``err`` is a communication failure with a lost peer, else
    None (then ``err`` is this rank's own problem and is raised as it is)."""
    if world_size < 2 or not is_comm_failure(err):
        return None
    missing = missing_ranks(rank, world_size, wait_s)
    first_line = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    advice = ("look at its log and node (out of memory, a lost node, a kill); continue with "
              "--resume auto, or run under 'launch/torchrun.sh --max-restarts N', which restarts "
              "the ranks and resumes by itself")
    if missing is None:
        who = "the rendezvous store is unreachable (rank 0's node or the launcher is gone)"
    elif not missing:
        return None  # everyone answered: not a lost peer
    else:
        who = f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} stopped answering"
    return (f"rank {rank}: a collective failed because {who} (dead, killed or hanging; "
            f"collective_timeout_s={timeout_s:g}): {first_line}. Next: {advice}")


class Heartbeat:
    """A daemon thread that beats for this rank in the store and watches its two neighbours
    (ranks r-1 and r+1): one that has not beaten for ``silence_s`` is reported once on
    stderr, naming it, while this rank still waits in a collective. On NCCL the watchdog
    ends a process at the collective timeout before Python sees an error; this message
    has been printed by then. Costs 3 store operations per ``interval_s`` per rank."""

    def __init__(self, rank: int, world_size: int, silence_s: float, interval_s: float = 2.0):
        self.rank, self.world_size = rank, world_size
        self.silence_s, self.interval_s = silence_s, interval_s
        self.watched = sorted({(rank - 1) % world_size, (rank + 1) % world_size} - {rank})
        self._stop = None
        self._thread = None

    def start(self) -> "Heartbeat":
        import threading

        if self.world_size < 2 or not dist.is_initialized():
            return self
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nsa-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """End the thread and wait for it: a daemon thread still inside a store call when the
        interpreter exits can abort the process at exit ("terminate called without an active
        exception": its C++ frames meet the forced unwind of a thread ended at finalization),
        which would report a finished run as failed. A store call in flight ends within
        ``timeout_s`` or is reported."""
        if self._thread is not None:
            self._stop.set()
            wait_s = max(timeout_s, 2 * self.interval_s)
            self._thread.join(timeout=wait_s)
            if self._thread.is_alive():
                import sys

                print(f"[peers] rank {self.rank}: the heartbeat thread is still in a store call after "
                      f"{wait_s:g} s; exiting without it", file=sys.stderr, flush=True)
            self._thread = None

    def _run(self) -> None:
        import sys

        try:
            store = dist.distributed_c10d._get_default_store()
            seen = {r: (-1, time.monotonic()) for r in self.watched}
            reported = set()
            while not self._stop.wait(self.interval_s):
                store.add(f"nsa_beat/{self.rank}", 1)
                now = time.monotonic()
                for r in self.watched:
                    count = store.add(f"nsa_beat/{r}", 0)  # reads without changing it
                    if count != seen[r][0]:
                        seen[r] = (count, now)
                        reported.discard(r)
                    elif now - seen[r][1] > self.silence_s and r not in reported:
                        reported.add(r)
                        print(f"[peers] rank {self.rank}: rank {r} has not been heard from for "
                              f"{now - seen[r][1]:.0f} s (dead, killed or frozen?); collectives "
                              f"waiting for it fail after collective_timeout_s", file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - the store is gone: the collectives will say so
            return

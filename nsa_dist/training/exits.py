"""Exit statuses of ``nsa-pretrain`` and the errors that map to them.

==== =====================================================================================
 0   the run reached ``train_steps`` (or ``max_minutes``) and saved
 2   bad input: a config, path or checkpoint that cannot be used (the message says which)
 74  a checkpoint could not be written (disk full, read-only, I/O error): training stopped
     there; the previous checkpoint is intact (``--resume auto`` continues from it)
 75  stopped by a signal (SIGTERM, SIGUSR1, SIGINT) after finishing the step and saving a
     checkpoint: requeue / restart with ``--resume auto`` to continue exactly
 76  a peer rank died or stopped answering within ``collective_timeout_s``: the message
     names it; a launcher with restarts (``launch/torchrun.sh --max-restarts``) resumes
 128+N a second signal N while stopping: exited at once, no checkpoint of the current step
==== =====================================================================================

75 is EX_TEMPFAIL of sysexits.h ("try again later"), 74 EX_IOERR; torchrun restarts a
worker on any non-zero status while restarts remain, and ``launch/slurm.sbatch`` requeues
the job when it was signalled.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_SAVE_FAILED = 74
EXIT_PREEMPTED = 75
EXIT_PEER_LOST = 76


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the run must stop (status ``EXIT_SAVE_FAILED``)."""


class Preempted(Exception):
    """A stop signal was honoured: the step finished and a checkpoint was written."""

    def __init__(self, signame: str, step: int, checkpoint):
        super().__init__(f"stopped by {signame} at step {step}; checkpoint {checkpoint}")
        self.signame, self.step, self.checkpoint = signame, step, checkpoint


class PeerLost(RuntimeError):
    """A collective failed because another rank died or hangs (status ``EXIT_PEER_LOST``)."""

"""The stop-signal handler and the lost-peer diagnosis, in-process (no training run)."""
from __future__ import annotations

import os
import signal

from nsa_dist.training.peers import is_comm_failure, lost_peer_message
from nsa_dist.training.stop import STOP_SIGNALS, StopRequest


def test_first_signal_requests_a_stop_and_arms_the_default_action():
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    stop = StopRequest().install()
    try:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.name == "SIGUSR1"
        # the second one would end the process at once, in any state
        assert all(signal.getsignal(sig) == signal.SIG_DFL for sig in STOP_SIGNALS)
    finally:
        stop.restore()
    assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == before


def test_only_communication_failures_are_blamed_on_a_peer():
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:31114")
    assert is_comm_failure(gloo)
    assert not is_comm_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_comm_failure(ValueError("connection"))
    assert lost_peer_message(gloo, rank=0, world_size=1, timeout_s=60) is None  # no peers
    assert lost_peer_message(RuntimeError("shapes"), rank=0, world_size=2, timeout_s=60) is None

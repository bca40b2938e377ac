"""The peers' heartbeat thread ends before the process does (nsa_dist/training/peers.py)."""
import threading
import time

from nsa_dist.training.peers import Heartbeat


def _with_slow_call(beat: Heartbeat, call_s: float) -> threading.Thread:
    """A stand-in for the beat thread that is inside a store call of ``call_s`` when stopped."""
    beat._stop = threading.Event()
    beat._thread = threading.Thread(target=lambda: (beat._stop.wait(), time.sleep(call_s)), daemon=True)
    beat._thread.start()
    return beat._thread


def test_stop_waits_for_a_store_call_in_flight(capsys):
    """stop() returns once the thread has ended, not after two beat intervals: a daemon thread
    left in a native call at interpreter exit can abort a finished run."""
    beat = Heartbeat(rank=1, world_size=2, silence_s=10.0, interval_s=0.05)
    thread = _with_slow_call(beat, 0.5)
    beat.stop()
    assert not thread.is_alive() and beat._thread is None
    assert "heartbeat" not in capsys.readouterr().err


def test_stop_reports_a_store_call_that_does_not_end(capsys):
    beat = Heartbeat(rank=1, world_size=2, silence_s=10.0, interval_s=0.05)
    thread = _with_slow_call(beat, 2.0)
    t0 = time.monotonic()
    beat.stop(timeout_s=0.2)
    assert time.monotonic() - t0 < 1.5 and thread.is_alive()
    assert "rank 1: the heartbeat thread is still in a store call" in capsys.readouterr().err
    thread.join()

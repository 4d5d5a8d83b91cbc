import os
import signal

from v2w_jax.training.preemption import PreemptionGuard


def test_sigterm_sets_flag_and_restores_handlers():
  before = signal.getsignal(signal.SIGTERM)
  with PreemptionGuard() as guard:
    assert not guard.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.requested
    assert guard.signal_name == "SIGTERM"
  assert signal.getsignal(signal.SIGTERM) is before

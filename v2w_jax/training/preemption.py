"""SIGTERM/SIGINT turn into a flag the loop checks at step boundaries: save, then exit cleanly.

Schedulers (SLURM, Kubernetes) send SIGTERM before killing a job; the loop finishes the step in
flight, writes a checkpoint and returns, and rerunning the same command resumes from it. A second
signal restores the default handler, so pressing Ctrl-C twice still kills the process at once.
"""

from __future__ import annotations

import signal
import threading


class PreemptionGuard:
  """Context manager installing the handlers in the main thread; `requested` tells the loop."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self._event = threading.Event()
    self._previous = {}
    self.signal_name: str | None = None

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name
    self._event.set()
    signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False

"""Console logging of the entry points: this project's messages, not the libraries' start-up chatter.

Called once by ``python -m v2w_jax.train`` and ``python -m v2w_jax.generate`` (never by library code):
INFO for ``v2w_jax``, WARNING and above for the libraries whose INFO lines say nothing a user acts
on -- orbax's handler set-up (logged through absl's logger), JAX's backend probing ("Unable to
initialize backend 'tpu'" on every machine without one), grain's worker start-up.
"""

from __future__ import annotations

import logging

QUIET_LOGGERS = ("absl", "jax", "orbax", "grain")


def setup_logging(level: int = logging.INFO) -> None:
  """Root at ``level`` (absl's handler, or a plain stderr one outside ``absl.app``); libraries at WARNING."""
  root = logging.getLogger()
  if not root.handlers:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  root.setLevel(level)
  for name in QUIET_LOGGERS:
    logging.getLogger(name).setLevel(max(level, logging.WARNING))

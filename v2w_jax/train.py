"""Entry point: ``python -m v2w_jax.train --config=configs/nemo.py [--config.a.b=v ...]``.

flags -> config -> (multi-process start-up) -> ``training.trainer.train``. Rerunning the same
command resumes from the job folder's latest checkpoint.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from v2w_jax.parallel import distributed

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file (configs/*.py).",
                                          lock_config=True)


def main(argv: list[str]) -> int:
  del argv
  distributed.initialize()  # before anything touches a JAX backend
  import jax  # pylint: disable=import-outside-toplevel

  from v2w_jax.data.dataset import DataError  # pylint: disable=import-outside-toplevel
  from v2w_jax.training import trainer  # pylint: disable=import-outside-toplevel

  user_errors = (ValueError, DataError, FileNotFoundError, MemoryError, trainer.NonFiniteLossError)

  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                      stream=sys.stderr)
  for noisy in ("absl", "jax._src", "orbax", "grain"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  config = _CONFIG.value
  if jax.process_index() == 0:
    print(f"v2w-jax: job {config.job.project}/{config.job.group}/{config.job.name}, "
          f"{jax.device_count()} {jax.default_backend()} device(s), {jax.process_count()} process(es)",
          flush=True)
  try:
    summary = trainer.train(config)
  except user_errors as err:  # a bad config, dataset or checkpoint: the message says what to change
    if os.environ.get("V2W_TRACEBACK") == "1":
      raise
    print(f"error: {err}\n(set V2W_TRACEBACK=1 for the traceback)", file=sys.stderr, flush=True)
    return 1
  if jax.process_index() == 0:
    print(f"done: step {summary['step']}, job folder {summary['job_dir']}", flush=True)
  return 0


if __name__ == "__main__":
  app.run(main)

"""Entry point: ``python -m v2w_jax.train --config=configs/nemo.py [--config.a.b=v ...]``.

flags -> config -> (multi-process start-up) -> ``training.trainer.train``. Rerunning the same
command resumes from the job folder's latest intact checkpoint. ``--help`` lists every config field.

Exit status: 0 done (``trainer.max_iter`` reached); 1 training failed (non-finite loss);
2 a mistake in the flags, config, data or checkpoints (one ``error:`` line says what to change);
75 stopped by SIGTERM/SIGINT (preemption) after saving a checkpoint: rerun the same command to resume.
"""

from __future__ import annotations

from absl import app

from v2w_jax import config_cli
from v2w_jax import user_errors
from v2w_jax.logging_setup import setup_logging
from v2w_jax.parallel import distributed

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: not finished, saved; a scheduler should run it again

_CONFIG = config_cli.ConfigFlag("configs/tiny.py", "Config file (configs/*.py).", doc=__doc__)


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    return user_errors.report(f"unexpected arguments {argv[1:]}: config fields are set as --config.a.b=value")
  distributed.initialize()  # before anything touches a JAX backend
  import jax  # pylint: disable=import-outside-toplevel

  from v2w_jax.data.dataset import DataError  # pylint: disable=import-outside-toplevel
  from v2w_jax.training import trainer  # pylint: disable=import-outside-toplevel

  setup_logging()
  config = _CONFIG.value
  if jax.process_index() == 0:
    print(f"v2w-jax: job {config.job.project}/{config.job.group}/{config.job.name}, "
          f"{jax.device_count()} {jax.default_backend()} device(s), {jax.process_count()} process(es)",
          flush=True)
  # A bad config, dataset or checkpoint: the message says what to change.
  run = user_errors.main_guard(trainer.train, errors=(user_errors.UserError, ValueError, DataError,
                                                      FileNotFoundError, MemoryError))
  run = user_errors.main_guard(run, errors=(trainer.NonFiniteLossError,), status=1)
  summary = run(config)
  if isinstance(summary, int):  # the exit status of a reported error
    return summary
  if summary.get("preempted"):
    if jax.process_index() == 0:
      print(f"stopped: {summary['preempted']} at step {summary['step']} (checkpoint saved); rerun the same "
            f"command to resume. Job folder {summary['job_dir']}", flush=True)
    return EXIT_PREEMPTED
  if jax.process_index() == 0:
    print(f"done: step {summary['step']}, job folder {summary['job_dir']}", flush=True)
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=_CONFIG.flags_parser)

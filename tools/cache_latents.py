"""Encodes K windows per clip of a dataset with the VAE once, for training with a latent cache.

    python tools/cache_latents.py DATASET --config=configs/nemo.py \
        --config.vae.checkpoint_path=checkpoints/wan_vae [--out=DATASET/latent_cache]

then train with ``--config.data.latent_cache.dir=DATASET/latent_cache``. The config gives the window
(``data.num_frames``, ``data.video_size``), ``data.latent_cache.windows_per_clip`` and the VAE
(``config.vae``; empty ``checkpoint_path`` = the same random weights the trainer would use). A killed
run continues where it stopped when started again; with several processes (the launchers' variables,
``launch/``) each encodes its share of the clips, on all of its GPUs. Logic in
``v2w_jax/data/latent_cache_build.py``; layout in ``v2w_jax/data/latent_cache.py``.

Exit status 0 when every clip of this process is cached, 1 when some are left out (listed), 2 for a
mistake in the command, config, data or weights (one ``error:`` line), e.g. ``--out`` holding a cache
of another setting.
"""

from __future__ import annotations

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402  pylint: disable=wrong-import-position

from v2w_jax import config_cli  # noqa: E402  pylint: disable=wrong-import-position
from v2w_jax import user_errors  # noqa: E402  pylint: disable=wrong-import-position

_CONFIG = config_cli.ConfigFlag(None, "experiment config file (configs/*.py)", doc=__doc__)
_OUT = flags.DEFINE_string("out", "", "cache folder (default: config.data.latent_cache.dir, else DATASET/latent_cache)")
_WORKERS = flags.DEFINE_integer("decode_workers", 4, "threads decoding and resizing windows")
_JSON = flags.DEFINE_string("json", "", "also write this process's summary (counts, timings) as JSON here")
_QUIET = flags.DEFINE_bool("quiet", False, "no progress bar")


def main(argv: list[str]) -> int:
  from v2w_jax.parallel import distributed  # pylint: disable=import-outside-toplevel

  distributed.initialize()  # before anything touches a JAX backend
  import jax  # pylint: disable=import-outside-toplevel

  from v2w_jax.data import latent_cache  # pylint: disable=import-outside-toplevel
  from v2w_jax.data import latent_cache_build  # pylint: disable=import-outside-toplevel
  from v2w_jax.logging_setup import setup_logging  # pylint: disable=import-outside-toplevel

  setup_logging()
  config = _CONFIG.value
  if len(argv) > 2:
    return user_errors.report(f"one DATASET folder expected, got {argv[1:]}")
  dataset_dir = argv[1] if len(argv) > 1 else config.data.dataset_dir
  out = _OUT.value or config.data.latent_cache.dir or str(pathlib.Path(dataset_dir) / latent_cache.DEFAULT_DIRNAME)
  build = user_errors.main_guard(latent_cache_build.build_cache,
                                 errors=(user_errors.UserError, ValueError, FileNotFoundError))
  result = build(config, dataset_dir, out, decode_workers=_WORKERS.value, progress=not _QUIET.value)
  if isinstance(result, int):  # the exit status of a reported error
    return result
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    multihost_utils.sync_global_devices("cache_latents done")  # every share written before the summary
  s = result.summary()
  tag = f"process {result.process_index}/{result.process_count}: " if result.process_count > 1 else ""
  speed = (f", {s['windows_per_s']:.3g} windows/s after the first batch on {result.devices} device(s) = "
           f"{s['clips_per_s_per_device']:.3g} clips/s per device" if result.steady_windows else "")
  print(f"{tag}{out}: {result.encoded_clips} clips encoded ({result.encoded_windows} windows), "
        f"{result.already_cached} already cached, {len(result.failed)} left out, of {result.clips}; "
        f"{result.seconds:.1f} s{speed}", flush=True)
  for path, reason in result.failed.items():
    print(f"  LEFT OUT {path}: {reason}", flush=True)
  if _JSON.value:
    pathlib.Path(_JSON.value).write_text(json.dumps(s, indent=1))
  if result.process_index == 0:
    print(f"train with --config.data.latent_cache.dir={out}", flush=True)
  return 1 if result.failed else 0


if __name__ == "__main__":
  app.run(main, flags_parser=_CONFIG.flags_parser)

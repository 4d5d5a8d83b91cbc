"""Dataset checker: names every unusable file and what is wrong, before training starts.

Fast: reads container headers (frame count, rate, size) with PyAV, caption files, and the
headers of the embedding ``.npy`` files — no frame is decoded unless ``decode=True`` (then the
last frame of each clip is decoded too, which catches files truncated after a front ``moov``).

    python -m v2w_jax.data.check DATASET --config=configs/tiny.py [--decode]
    python -m v2w_jax.data.check DATASET --config=... --config.data.latent_cache.dir=CACHE [--vae]

With ``data.latent_cache.dir`` set it also reports the latent cache (``data/latent_cache.py``): clips
cached and their windows, clips missing, entries or a header that do not fit the config, and with
``--vae`` whether the cache was encoded with ``config.vae``'s weights (loads them).

Exit status 0 when every file is usable (and the cache fits), 1 otherwise, 2 for a mistake in the
command (a missing folder or config file: one ``error:`` line). The trainer calls
:func:`check_dataset` at start (``data.check_at_start``) and either stops with the report or, with
``data.skip_bad_files``, leaves the bad files out and reports their number.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import pathlib
import sys
from typing import Any

from v2w_jax.data import dataset as dataset_lib
from v2w_jax.data import text as text_lib
from v2w_jax.data import video as video_lib


@dataclasses.dataclass(frozen=True)
class Problem:
  path: str  # the video the problem makes unusable
  reason: str


@dataclasses.dataclass
class CheckReport:
  dataset_dir: str
  num_videos: int
  problems: list[Problem]
  num_captions: int = 0  # distinct captions of the good videos

  @property
  def ok(self) -> bool:
    return not self.problems

  @property
  def num_good(self) -> int:
    return self.num_videos - len(self.problems)

  def format(self) -> str:
    head = (
        f"{self.dataset_dir}: {self.num_videos} videos, {self.num_good} usable, "
        f"{len(self.problems)} bad, {self.num_captions} distinct captions"
    )
    lines = [head] + [f"  BAD {p.path}: {p.reason}" for p in self.problems]
    return "\n".join(lines)


def _check_one(
    video: pathlib.Path, spec: dataset_lib.DataSpec, store: text_lib.TextEmbeddingStore, store_error: str | None, decode: bool
) -> tuple[list[str], str | None]:
  """Everything wrong with one video (empty list when usable), and its caption."""
  reasons = []
  try:
    info = video_lib.probe_video(video)
    if info.num_frames < spec.num_frames:
      reasons.append(f"{info.num_frames} frames, fewer than the {spec.num_frames} a sample needs")
    elif decode:
      try:
        video_lib.decode_clip(video, 1, start=info.num_frames - 1, num_threads=1)
      except video_lib.VideoError as e:
        reasons.append(f"last frame does not decode: {str(e).removeprefix(str(video) + ': ')}")
  except video_lib.VideoError as e:
    reasons.append(str(e).removeprefix(str(video) + ": "))
  caption = None
  try:
    caption = dataset_lib.read_caption(video)
  except dataset_lib.DataError as e:
    reasons.append(str(e).removeprefix(str(video) + ": "))
  if caption is not None:
    if store_error is not None:
      reasons.append(f"no text embedding: {store_error}")
    else:
      err = store.validate(caption, spec.text_tokens, spec.text_width)
      if err is not None:
        reasons.append(f"text embedding: {err}")
  return reasons, caption


def check_dataset(
    dataset_dir: str | pathlib.Path,
    config: Any,
    *,
    spec: dataset_lib.DataSpec | None = None,
    decode: bool = False,
    num_threads: int = 8,
) -> CheckReport:
  """Checks every video of ``dataset_dir`` against ``config`` (frames, caption, embedding).

  Raises:
    DataError: the folder itself is unusable (missing, no ``videos/``, no ``.mp4``).
  """
  if spec is None:
    spec = dataset_lib.DataSpec.from_config(config)
    spec = dataclasses.replace(
        spec,
        dataset_dir=str(dataset_dir),
        embeddings_dir=str(text_lib.default_store_dir(dataset_dir, config.data.get("embeddings_dir", ""))),
    )
  videos = dataset_lib.list_videos(dataset_dir)
  store = text_lib.TextEmbeddingStore(spec.embeddings_dir)
  store_error = None
  try:
    info = store.info()
    if (info.tokens, info.width) != (spec.text_tokens, spec.text_width):
      store_error = (
          f"store {store.root} holds [{info.tokens}, {info.width}] embeddings, the config needs "
          f"[{spec.text_tokens}, {spec.text_width}] (data.text_tokens, model.crossattn_proj_in_channels)"
      )
  except text_lib.EmbeddingError as e:
    store_error = str(e)
  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    results = list(pool.map(lambda v: _check_one(v, spec, store, store_error, decode), videos))
  problems, captions = [], set()
  for video, (reasons, caption) in zip(videos, results):
    if reasons:
      problems.append(Problem(str(video), "; ".join(reasons)))
    else:
      captions.add(caption)
  return CheckReport(str(dataset_dir), len(videos), problems, num_captions=len(captions))


def main(argv: list[str], config: Any, decode: bool, *, check_vae: bool = False) -> int:
  from v2w_jax.user_errors import report as report_error  # pylint: disable=import-outside-toplevel

  dataset_dir = argv[1] if len(argv) > 1 else config.data.dataset_dir
  try:
    report = check_dataset(dataset_dir, config, decode=decode)
  except dataset_lib.DataError as e:
    return report_error(e)
  print(report.format())
  ok = report.ok
  cache_dir = config.data.latent_cache.dir if "latent_cache" in config.data else ""
  if cache_dir:
    ok = _report_latent_cache(cache_dir, dataset_dir, config, report, check_vae=check_vae) and ok
  return 0 if ok else 1


def _report_latent_cache(cache_dir: str, dataset_dir: str, cfg: Any, report: CheckReport, *, check_vae: bool) -> bool:
  """Prints the cache's state for the dataset's usable clips; whether it fits."""
  from v2w_jax.data import latent_cache  # pylint: disable=import-outside-toplevel

  bad = {p.path for p in report.problems}
  videos = [str(v) for v in dataset_lib.list_videos(dataset_dir) if str(v) not in bad]
  cache_report = latent_cache.check_cache(cache_dir, cfg, videos, dataset_dir=dataset_dir)
  print(cache_report.format())
  if not check_vae or cache_report.setting:
    return cache_report.ok
  import jax  # pylint: disable=import-outside-toplevel

  from v2w_jax.inference import weights  # pylint: disable=import-outside-toplevel

  params = weights.config_vae_params(cfg, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  try:
    latent_cache.check_vae_weights(cfg, params)
  except latent_cache.LatentCacheError as e:
    print(f"  VAE {e}")
    return False
  print("  VAE weights: config.vae's, as the cache's fingerprint says")
  return cache_report.ok


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  from v2w_jax.config_cli import ConfigFlag  # pylint: disable=g-import-not-at-top

  _CONFIG = ConfigFlag(None, "experiment config file", doc=__doc__)
  _DECODE = flags.DEFINE_bool("decode", False, "also decode the last frame of every clip (slower)")
  _VAE = flags.DEFINE_bool("vae", False, "with a latent cache: load config.vae's weights and compare their fingerprint")
  app.run(lambda argv: sys.exit(main(argv, _CONFIG.value, _DECODE.value, check_vae=_VAE.value)),
          flags_parser=_CONFIG.flags_parser)

"""Builds a latent cache (``data/latent_cache.py``): K windows per clip, VAE-encoded once.

Per clip: the window starts are :func:`video.spread_starts` over the frame count of the reader the
online path uses; each window is decoded and resized by :func:`video.decode_clip` (the online path's
function) in a thread pool, normalised by ``models/vae.uint8_to_unit_range`` and encoded by
``models/vae.encode_mean`` with the weights ``inference/weights.config_vae_params`` gives the trainer
for the same config. Windows are batched over this process's local devices (one window each); the
next batch is dispatched before the previous one is fetched, so the devices do not wait for the
host's writes.

Clips are split over processes by index (clip i goes to process i mod P); processes share nothing
but the folder. Each clip's windows are committed as one entry (written aside, then renamed), so a
killed build leaves no half-written entry and the next one encodes only what is missing. A clip that
cannot be read is reported and left out; the rest are cached.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import os
import pathlib
import time
from typing import Any, Callable

import numpy as np

from v2w_jax.data import dataset as dataset_lib
from v2w_jax.data import latent_cache as cache_lib
from v2w_jax.data import text as text_lib
from v2w_jax.data import video as video_lib

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class BuildResult:
  """What one process did; ``steady_*`` exclude the first batch (compilation)."""

  cache_dir: str
  process_index: int
  process_count: int
  devices: int
  clips: int  # this process's share of the dataset
  already_cached: int
  encoded_clips: int = 0
  encoded_windows: int = 0
  failed: dict[str, str] = dataclasses.field(default_factory=dict)  # clip path -> reason
  unfinished_removed: int = 0
  seconds: float = 0.0
  first_batch_s: float = 0.0
  steady_s: float = 0.0
  steady_windows: int = 0

  @property
  def windows_per_s(self) -> float:
    return self.steady_windows / self.steady_s if self.steady_s > 0 else float("nan")

  def summary(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["windows_per_s"] = self.windows_per_s
    per_clip = self.encoded_windows / self.encoded_clips if self.encoded_clips else float("nan")
    out["clips_per_s_per_device"] = self.windows_per_s / per_clip / self.devices
    return out


@dataclasses.dataclass
class _Clip:
  index: int
  path: str
  starts: list[int]
  total_frames: int
  caption_key: str
  fps: float = float("nan")
  means: list[Any] = dataclasses.field(default_factory=list)
  failed: bool = False


class _NoBar:
  """What the build calls on a progress bar, doing nothing (``progress=False``: tqdm not needed)."""

  def update(self, n: int = 1) -> None:
    del n

  def set_postfix(self, **kwargs: Any) -> None:
    del kwargs

  def close(self) -> None:
    pass


def _progress_bar(total: int, desc: str):
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  return tqdm(total=total, unit="clip", desc=desc, dynamic_ncols=True)  # rate and ETA


def _encoder(config: Any, devices: list) -> tuple[Callable, Any]:
  """(jitted uint8 windows [D,3,T,H,W] -> VAE means, the VAE params) over a 1-D mesh of ``devices``."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel

  from v2w_jax.inference import weights  # pylint: disable=import-outside-toplevel
  from v2w_jax.models import vae as vae_lib  # pylint: disable=import-outside-toplevel

  vae_cfg = vae_lib.VAEConfig.from_config(config.vae)
  mesh = Mesh(np.asarray(devices), ("batch",))
  rep, batch = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("batch"))
  params = weights.config_vae_params(config, rep)
  encode = jax.jit(lambda p, v: vae_lib.encode_mean(vae_cfg, p, vae_lib.uint8_to_unit_range(v)),
                   in_shardings=(rep, batch), out_shardings=batch)
  return (lambda videos: encode(params, jax.device_put(videos, batch))), params


class _Build:
  """One process's build: plans clips, decodes their windows ahead in a thread pool, commits entries."""

  def __init__(self, config: Any, cache: cache_lib.LatentCache, header: dict, result: BuildResult, *,
               batch: int, decode_workers: int, progress: bool, t_start: float):
    self.t_start, self.t_first = t_start, None
    self.num_frames = int(config.data.num_frames)
    self.size = tuple(int(s) for s in config.data.video_size)
    self.windows_per_clip = int(header["windows_per_clip"])
    self.decode_threads = int(config.data.get("decode_threads", 2))
    self.cache, self.result, self.batch = cache, result, batch
    self.decode_workers = max(1, decode_workers)
    self.shape_meta = {k: header[k] for k in (*cache_lib.SHAPE_KEYS, "vae_fingerprint")}
    desc = "caching latents"
    if result.process_count > 1:
      desc += f" (process {result.process_index + 1}/{result.process_count})"
    self.bar = _progress_bar(result.clips - result.already_cached, desc) if progress else _NoBar()

  def fail(self, path: str, err: Exception) -> None:
    reason = str(err).removeprefix(f"{path}: ")
    self.result.failed[path] = reason
    _log.warning("leaving out %s: %s", path, reason)

  def plan(self, index: int, path: str) -> _Clip | None:
    """The clip's windows (starts over the frame count the online reader sees); None if unusable."""
    try:
      caption = dataset_lib.read_caption(path)
      total = video_lib.open_reader(path, num_threads=self.decode_threads).total
      starts = video_lib.spread_starts(total, self.num_frames, self.windows_per_clip)
    except (dataset_lib.DataError, video_lib.VideoError, ValueError) as e:
      self.fail(path, e)
      return None
    return _Clip(index, path, starts, total, text_lib.caption_key(caption), means=[None] * len(starts))

  def windows(self, todo: list[tuple[int, str]]):
    """(clip, window k, start), clip after clip."""
    for index, path in todo:
      clip = self.plan(index, path)
      if clip is not None:
        for k, start in enumerate(clip.starts):
          yield clip, k, start

  def decoded_batches(self, todo: list[tuple[int, str]]):
    """Lists of ``self.batch`` (or, at the end, fewer) decoded windows: ([(clip, k)], [uint8 video])."""
    lookahead = 2 * self.batch + self.decode_workers
    source = self.windows(todo)
    queue: collections.deque = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(self.decode_workers) as pool:

      def refill():
        while len(queue) < lookahead and (item := next(source, None)) is not None:
          clip, k, start = item
          queue.append((clip, k, pool.submit(video_lib.decode_clip, clip.path, self.num_frames, start=start,
                                             size=self.size, num_threads=self.decode_threads)))

      refill()
      while queue:
        items, videos = [], []
        while queue and len(items) < self.batch:
          clip, k, future = queue.popleft()
          refill()
          try:
            decoded = future.result()
          except (video_lib.VideoError, ValueError, OSError) as e:
            if not clip.failed:
              clip.failed = True
              self.fail(clip.path, e)
            continue
          if not clip.failed:
            clip.fps = decoded.fps
            items.append((clip, k))
            videos.append(decoded.video)
        if items:
          yield items, videos

  def fetch(self, items: list[tuple[_Clip, int]], device_means: Any) -> None:
    """Waits for a dispatched batch, stores its windows and commits each clip whose windows are all
    there (rows past ``items`` are padding). Times the first batch (compilation) apart from the rest."""
    means = np.asarray(device_means)
    now = time.perf_counter()
    if self.t_first is None:
      self.t_first = now
      self.result.first_batch_s = now - self.t_start
    else:
      self.result.steady_windows += len(items)
    for (clip, k), mean in zip(items, means):
      clip.means[k] = mean
      if clip.failed or any(m is None for m in clip.means):
        continue
      attrs = dict(clip=pathlib.Path(clip.path).stem, video=pathlib.Path(clip.path).name,
                   window_starts=clip.starts, fps=clip.fps, total_frames=clip.total_frames,
                   caption_key=clip.caption_key, **self.shape_meta)
      self.cache.write_entry(attrs["clip"], np.stack(clip.means), attrs, process_index=self.result.process_index)
      clip.means = []
      self.result.encoded_clips += 1
      self.bar.update(1)
    self.result.encoded_windows += len(items)
    self.bar.set_postfix(windows=self.result.encoded_windows, failed=len(self.result.failed))


def build_cache(
    config: Any,
    dataset_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    decode_workers: int = 4,
    progress: bool = True,
) -> BuildResult:
  """Encodes this process's missing clips of ``dataset_dir`` into the cache ``out_dir``.

  Raises:
    DataError: the dataset folder is unusable, or ``out_dir`` holds latents of another setting.
    ValueError: ``data.latent_cache.windows_per_clip`` < 1.
  """
  import jax  # pylint: disable=import-outside-toplevel

  from v2w_jax.convert import params_io  # pylint: disable=import-outside-toplevel

  t_start = time.perf_counter()
  if process_index is None or process_count is None:
    process_index, process_count = jax.process_index(), jax.process_count()
  windows_per_clip = int(config.data.latent_cache.windows_per_clip)
  if windows_per_clip < 1:
    raise ValueError(f"config.data.latent_cache.windows_per_clip={windows_per_clip}: cache at least one window "
                     "per clip")
  videos = dataset_lib.list_videos(dataset_dir)
  mine = [(i, str(v)) for i, v in enumerate(videos) if i % process_count == process_index]

  cache = cache_lib.LatentCache(out_dir)
  # The setting first (cheap), the weights' fingerprint once they are loaded.
  cache.check_header(cache_lib.make_header(config, "", windows_per_clip), (*cache_lib.SHAPE_KEYS, "windows_per_clip"))
  devices = jax.local_devices()
  encode, params = _encoder(config, devices)
  header = cache_lib.make_header(config, params_io.fingerprint(params), windows_per_clip)
  cache.write_header(header)
  result = BuildResult(str(out_dir), process_index, process_count, len(devices), clips=len(mine),
                       already_cached=0, unfinished_removed=cache.clear_tmp(process_index))
  done = cache.committed()
  todo = [(i, p) for i, p in mine if pathlib.Path(p).stem not in done]
  result.already_cached = len(mine) - len(todo)
  build = _Build(config, cache, header, result, batch=len(devices), decode_workers=decode_workers,
                 progress=progress, t_start=t_start)

  pending = None  # the next batch is dispatched before the previous one is fetched and written
  for items, videos in build.decoded_batches(todo):
    out = encode(np.stack(videos + [videos[-1]] * (len(devices) - len(videos))))  # one window per device
    if pending is not None:
      build.fetch(*pending)
    pending = (items, out)
  if pending is not None:
    build.fetch(*pending)
  build.bar.close()
  result.seconds = time.perf_counter() - t_start
  if build.t_first is not None:
    result.steady_s = time.perf_counter() - build.t_first
  return result

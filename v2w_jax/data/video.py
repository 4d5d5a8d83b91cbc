"""Video clips: container probing, window decoding (decord, PyAV fallback), the reference resize and
mp4 writing (:func:`write_mp4`, for the sample dataset, training samples and generation).

The reference (``VideoDataset``) decodes ``num_frames`` consecutive frames with decord, then resizes
each frame with torchvision's antialiased bilinear ``F.resize`` on ``float/255`` values, multiplies
by 255, clamps to [0, 255] and *truncates* to uint8. :func:`resize_frames` reproduces that in numpy
(separable, banded weights computed exactly as PyTorch's antialias kernel does), so the base package
needs no torch; it agrees with ``torch.nn.functional.interpolate(antialias=True)`` to ±1 uint8
(tested). One fix versus the reference: the window start is uniform over *all* valid positions
``0..total-num_frames`` (the reference never draws the last one and rejects clips of exactly
``num_frames`` frames).
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
import logging
import math
import os
import pathlib
from typing import Sequence

import numpy as np

from v2w_jax.user_errors import UserError

DEFAULT_FPS = 16.0

_log = logging.getLogger(__name__)


class VideoError(UserError, RuntimeError):
  """A video file cannot be used; the message names the file and what is wrong."""


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  """Container metadata of one video (no frame is decoded to get it)."""

  num_frames: int
  fps: float  # NaN when the container has no usable rate
  height: int
  width: int
  codec: str


# ----------------------------------------------------------------------------------------------
# Probing.


def probe_video(path: str | os.PathLike) -> VideoInfo:
  """Reads frame count, rate and size from the container header with PyAV (fast: no decoding).

  Raises:
    VideoError: the file is missing, not a container PyAV can open, or has no video stream.
  """
  import av  # pylint: disable=import-outside-toplevel

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise VideoError(f"{path}: file does not exist")
  if os.path.getsize(path) == 0:
    raise VideoError(f"{path}: file is empty")
  try:
    with av.open(path, metadata_errors="ignore") as container:
      if not container.streams.video:
        raise VideoError(f"{path}: no video stream in the container")
      stream = container.streams.video[0]
      num_frames = int(stream.frames or 0)
      if num_frames <= 0:  # No frame count in the header (e.g. some mkv/webm): count packets.
        num_frames = sum(1 for p in container.demux(stream) if p.size > 0)
      rate = stream.average_rate or stream.guessed_rate
      fps = float(rate) if rate else math.nan
      ctx = stream.codec_context
      return VideoInfo(num_frames, fps, int(ctx.height), int(ctx.width), str(ctx.name))
  except VideoError:
    raise
  except Exception as e:  # av raises many error types (InvalidDataError, OSError...).
    raise VideoError(f"{path}: cannot open the video container ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------------------------
# Decoding.


def _have_decord() -> bool:
  try:
    import decord  # pylint: disable=import-outside-toplevel,unused-import  # noqa: F401
  except ImportError:
    return False
  return True


def _sanitize_fps(fps: float | None, path: str) -> float:
  if fps is None or not math.isfinite(fps) or fps <= 0:
    _log.warning("%s: no usable frame rate in the container; using %s fps", path, DEFAULT_FPS)
    return DEFAULT_FPS
  return float(fps)


def draw_start(total: int, num_frames: int, rng: np.random.Generator) -> int:
  """A window start uniform over all valid positions ``0..total-num_frames`` (inclusive)."""
  if total < num_frames:
    raise ValueError(f"clip has {total} frames, fewer than the {num_frames} requested")
  return int(rng.integers(0, total - num_frames + 1))


def spread_starts(total: int, num_frames: int, count: int) -> list[int]:
  """``count`` window starts spread evenly over the valid positions ``0..total-num_frames``.

  The first window starts at frame 0 and, for ``count >= 2``, the last one ends at the clip's last
  frame; a clip with fewer valid positions than ``count`` gives each position once. The windows the
  latent cache stores (the online path draws one start uniformly, :func:`draw_start`).
  """
  if total < num_frames:
    raise ValueError(f"clip has {total} frames, fewer than the {num_frames} requested")
  if count < 1:
    raise ValueError(f"need at least one window per clip, got {count}")
  last = total - num_frames
  return sorted({int(round(s)) for s in np.linspace(0, last, min(count, last + 1))})


class _DecordReader:
  """A decord reader: frame count from its index, random access by frame number."""

  def __init__(self, path: str, num_threads: int):
    import decord  # pylint: disable=import-outside-toplevel

    self.path = path
    try:
      self._vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=num_threads)
    except Exception as e:
      raise VideoError(f"{path}: decord cannot open the video ({type(e).__name__}: {e})") from e
    self.total = len(self._vr)

  def fps(self) -> float | None:
    try:
      return float(self._vr.get_avg_fps())
    except Exception:  # pylint: disable=broad-except
      return None

  def read(self, start: int, num_frames: int) -> np.ndarray:
    try:
      frames = self._vr.get_batch(list(range(start, start + num_frames))).asnumpy()
    except Exception as e:
      raise VideoError(
          f"{self.path}: decoding frames {start}..{start + num_frames - 1} failed ({type(e).__name__}: {e})"
      ) from e
    return frames


class _PyAVReader:
  """A PyAV reader: decodes from the start up to the window (fallback; slower on long clips)."""

  def __init__(self, path: str, num_threads: int):
    del num_threads
    self.path = path
    info = probe_video(path)
    self.total = info.num_frames
    self._fps = info.fps

  def fps(self) -> float | None:
    return self._fps

  def read(self, start: int, num_frames: int) -> np.ndarray:
    import av  # pylint: disable=import-outside-toplevel

    out = []
    decoded = 0  # frames decoded from the start of the file
    try:
      with av.open(self.path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
          if decoded >= start:
            out.append(frame.to_ndarray(format="rgb24"))
          decoded += 1
          if len(out) == num_frames:
            break
    except Exception as e:
      raise VideoError(
          f"{self.path}: truncated or corrupt: decoding stops after {decoded} of the {self.total} frames the "
          f"container lists ({type(e).__name__}: {e}); the window needed frames {start}..{start + num_frames - 1}"
      ) from e
    if len(out) < num_frames:
      # The stream ended early: every decode of this file stops at the same frame, whatever the window.
      raise VideoError(
          f"{self.path}: truncated or corrupt: only {decoded} of the {self.total} frames the container lists "
          f"decode; the window needed frames {start}..{start + num_frames - 1}"
      )
    return np.stack(out)


def open_reader(path: str | os.PathLike, *, backend: str = "auto", num_threads: int = 2):
  """Opens ``path`` with decord (``auto`` when importable) or PyAV."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise VideoError(f"{path}: file does not exist")
  if backend == "auto":
    backend = "auto-decord" if _have_decord() else "pyav"
  if backend == "decord":
    return _DecordReader(path, num_threads)
  if backend == "auto-decord":  # decord, or PyAV for files decord cannot open
    try:
      return _DecordReader(path, num_threads)
    except VideoError as first:
      try:
        return _PyAVReader(path, num_threads)
      except VideoError as second:
        raise VideoError(f"{second} (decord: {first})") from second
  if backend == "pyav":
    return _PyAVReader(path, num_threads)
  raise ValueError(f"unknown video backend {backend!r} (auto | decord | pyav)")


_DECORD_FALLBACK_WARNED: set[str] = set()  # warn once per file, not once per sample


def _checked(frames: np.ndarray, num_frames: int, path: str) -> np.ndarray:
  if frames.ndim != 4 or frames.shape[0] != num_frames or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise VideoError(
        f"{path}: decoder returned frames of shape {frames.shape} {frames.dtype}, "
        f"expected ({num_frames}, H, W, 3) uint8"
    )
  return frames


@dataclasses.dataclass(frozen=True)
class Clip:
  """A decoded, resized window: ``video`` uint8 [C, T, H, W]."""

  video: np.ndarray
  fps: float
  start: int
  total_frames: int


def decode_clip(
    path: str | os.PathLike,
    num_frames: int,
    rng: np.random.Generator | None = None,
    *,
    size: Sequence[int] | None = None,
    start: int | None = None,
    backend: str = "auto",
    num_threads: int = 2,
) -> Clip:
  """Decodes ``num_frames`` consecutive frames and resizes them like the reference.

  Args:
    path: the video file.
    num_frames: window length T.
    rng: draws the window start uniformly over ``0..total-T`` (ignored when ``start`` is given).
    size: (H, W) output size; None keeps the native size.
    start: a fixed window start (tests, benchmarks).
    backend: ``auto`` (decord if importable, else PyAV), ``decord`` or ``pyav``.
    num_threads: decoder threads.

  Returns:
    A :class:`Clip` with uint8 ``video`` [3, T, H, W] and the container's fps (16 if missing).

  Raises:
    VideoError: unreadable file, too few frames, or a decode that does not give T frames of
      the expected size.
  """
  path = os.fspath(path)
  reader = open_reader(path, backend=backend, num_threads=num_threads)
  total = reader.total
  if total < num_frames:
    raise VideoError(f"{path}: clip has {total} frames, fewer than the {num_frames} frames a sample needs")
  if start is None:
    start = draw_start(total, num_frames, rng if rng is not None else np.random.default_rng())
  elif not 0 <= start <= total - num_frames:
    raise ValueError(f"{path}: start {start} outside 0..{total - num_frames}")
  try:
    frames = _checked(reader.read(start, num_frames), num_frames, path)
  except VideoError as first:
    if backend != "auto" or not isinstance(reader, _DecordReader):
      raise
    # decord 0.6 fails on some valid files (e.g. widths 24/48: a row-padding bug); PyAV decodes them.
    if path not in _DECORD_FALLBACK_WARNED:
      _DECORD_FALLBACK_WARNED.add(path)
      _log.warning("%s; retrying with PyAV", first)
    try:
      frames = _checked(_PyAVReader(path, num_threads).read(start, num_frames), num_frames, path)
    except VideoError as second:
      raise VideoError(f"{second} (decord failed too: {first})") from second
  fps = _sanitize_fps(reader.fps(), path)
  if size is not None:
    video = resize_frames(frames, size)
  else:
    video = np.ascontiguousarray(frames.transpose(3, 0, 1, 2))
  return Clip(video=video, fps=fps, start=start, total_frames=total)


# ----------------------------------------------------------------------------------------------
# Resize (torchvision F.resize(antialias=True) on float/255 frames, then x255, clamp, truncate).


@functools.lru_cache(maxsize=64)
def aa_bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Source indices and weights [out, K] of PyTorch's antialiased bilinear (align_corners=False).

  Triangle filter stretched by the scale when downsampling (plain bilinear when upsampling),
  support clipped to the image, weights normalised to sum 1 — the construction of
  ``_compute_weights_aa`` in ATen's ``UpSampleKernel.cpp``, in float32 like ATen for float
  images (so the rounding of the filter centres matches). Padded taps have weight 0.
  """
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  support = scale if scale >= 1.0 else f32(1.0)
  invscale = f32(1.0) / scale if scale >= 1.0 else f32(1.0)
  centers = scale * (np.arange(out_size, dtype=f32) + f32(0.5))
  xmin = np.maximum((centers - support + f32(0.5)).astype(np.int64), 0)  # truncation, as in C
  xmax = np.minimum((centers + support + f32(0.5)).astype(np.int64), in_size)
  k = int((xmax - xmin).max())
  j = np.arange(k)[None, :]
  arg = ((j + xmin[:, None]).astype(f32) - centers[:, None] + f32(0.5)) * invscale
  w = np.where(j < (xmax - xmin)[:, None], np.maximum(f32(0.0), f32(1.0) - np.abs(arg)), f32(0.0))
  total = np.zeros(out_size, f32)
  for t in range(k):  # sequential float32 sum, as ATen accumulates
    total += w[:, t]
  w = (w / total[:, None]).astype(f32)
  assert (w >= 0).all()  # resize_frames relies on it (no clamp needed)
  idx = np.minimum(xmin[:, None] + j, in_size - 1)
  return idx, w


@functools.lru_cache(maxsize=64)
def _band_blocks(in_size: int, out_size: int, block: int = 16) -> tuple[tuple[int, int, int, int, np.ndarray], ...]:
  """The resampling matrix [out, in] cut into dense row blocks over their input band.

  Each entry is (o0, o1, i0, i1, W[o0:o1, i0:i1]); the band is a few pixels wider than the
  block times the scale, so block matmuls cost O(out · taps) instead of O(out · in).
  """
  idx, w = aa_bilinear_taps(in_size, out_size)
  dense = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  for t in range(idx.shape[1]):
    np.add.at(dense, (rows, idx[:, t]), w[:, t])
  blocks = []
  for o0 in range(0, out_size, block):
    o1 = min(out_size, o0 + block)
    cols = np.nonzero(dense[o0:o1].any(axis=0))[0]
    i0, i1 = int(cols[0]), int(cols[-1]) + 1
    blocks.append((o0, o1, i0, i1, np.ascontiguousarray(dense[o0:o1, i0:i1])))
  return tuple(blocks)


# OpenBLAS runs a GEMM single-threaded when M·N·K is below ~262k; tiles above that spawn threads,
# which is ~10x slower at these skinny shapes (measured) and oversubscribes the loader workers.
_TILE_MNK = 1 << 17


def _resize_rows(x: np.ndarray, out: np.ndarray) -> np.ndarray:
  """Resamples float32 planes ``x`` [N, H, W] along H into ``out`` [N, h, W] (banded tiled GEMMs)."""
  n, _, w = x.shape
  for o0, o1, i0, i1, wb in _band_blocks(x.shape[1], out.shape[1]):
    step = max(64, _TILE_MNK // wb.size)
    for p in range(n):
      for c0 in range(0, w, step):
        np.matmul(wb, x[p, i0:i1, c0 : c0 + step], out=out[p, o0:o1, c0 : c0 + step])
  return out


def _resize_cols(x: np.ndarray, out: np.ndarray) -> np.ndarray:
  """Resamples float32 planes ``x`` [N, H, W] along W into ``out`` [N, H, w] (banded tiled GEMMs)."""
  n, h, w = x.shape
  flat, flat_out = x.reshape(n * h, w), out.reshape(n * h, out.shape[2])
  for o0, o1, i0, i1, wb in _band_blocks(w, out.shape[2]):
    wt = np.ascontiguousarray(wb.T)
    step = max(64, _TILE_MNK // wb.size)
    for r0 in range(0, n * h, step):
      np.matmul(flat[r0 : r0 + step, i0:i1], wt, out=flat_out[r0 : r0 + step, o0:o1])
  return out


def resize_frames(frames: np.ndarray, size: Sequence[int], *, chunk: int = 2) -> np.ndarray:
  """Resizes uint8 frames [T, H, W, C] to planar uint8 [C, T, h, w] as the reference preprocesses.

  ``float32(frames)/255`` → antialiased bilinear (separable: height, then width; an axis whose
  size does not change is left alone, which is exact) → ×255 → clamp [0, 255] → truncation to
  uint8. The clamp is a no-op here and skipped: the weights are non-negative and sum to 1 up to
  float32 rounding, so results lie in [0, 255.0001]. Frames are processed ``chunk`` at a time
  through buffers allocated once (small buffers stay in cache; page faults on fresh large
  arrays cost as much as the arithmetic).
  """
  if frames.dtype != np.uint8 or frames.ndim != 4:
    raise ValueError(f"expected uint8 frames [T, H, W, C], got {frames.shape} {frames.dtype}")
  out_h, out_w = (int(s) for s in size)
  if out_h <= 0 or out_w <= 0:
    raise ValueError(f"bad output size {tuple(size)}")
  t, in_h, in_w, c = frames.shape
  out = np.empty((c, t, out_h, out_w), np.uint8)
  if (in_h, in_w) == (out_h, out_w):
    # Identity weights: x/255*255 returns every uint8 value exactly (checked for all 256).
    out[...] = frames.transpose(3, 0, 1, 2)
    return out
  chunk = max(1, min(chunk, t))
  planar = np.empty((c, chunk, in_h, in_w), np.uint8)
  src = np.empty((c * chunk, in_h, in_w), np.float32)
  mid = np.empty((c * chunk, out_h, in_w), np.float32) if in_h != out_h else None
  dst = np.empty((c * chunk, out_h, out_w), np.float32) if in_w != out_w else None
  for s in range(0, t, chunk):
    tc = min(chunk, t - s)
    pv = planar[:, :tc]
    np.copyto(pv, frames[s : s + tc].transpose(3, 0, 1, 2))
    x = src[: c * tc]
    np.divide(pv.reshape(c * tc, in_h, in_w), np.float32(255.0), out=x)
    if mid is not None:
      x = _resize_rows(x, mid[: c * tc])
    if dst is not None:
      x = _resize_cols(x, dst[: c * tc])
    np.multiply(x, np.float32(255.0), out=x)
    np.copyto(out[:, s : s + tc], x.reshape(c, tc, out_h, out_w), casting="unsafe")  # truncates, like .to(uint8)
  return out


# ----------------------------------------------------------------------------------------------
# Writing.


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
  """Writes one uint8 RGB image [H, W, 3] as PNG (PyAV's image2 muxer; no imaging library needed)."""
  import av  # pylint: disable=import-outside-toplevel

  with av.open(str(path), "w", format="image2") as out:
    stream = out.add_stream("png")
    stream.width, stream.height, stream.pix_fmt = image.shape[1], image.shape[0], "rgb24"
    for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
      out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)


def write_mp4(
    path: str | os.PathLike, frames: np.ndarray, fps: float = 16, *, qp: int = 12, threads: int = 1
) -> None:
  """Encodes uint8 RGB frames [T, H, W, 3] as H.264 yuv420p (mpeg4 if no libx264) with PyAV.

  Constant quantiser ``qp`` (no rate control: x264's crf/mb-tree lookahead gave different
  bitstreams for the same frames, measured) and ``threads=1`` make the file reproducible;
  ``threads=0`` lets the encoder pick (fast, for large benchmark clips).
  """
  import av  # pylint: disable=import-outside-toplevel

  t, h, w, _ = frames.shape
  if h % 2 or w % 2:
    raise ValueError(f"yuv420p needs even frame sizes, got {h}x{w}")
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp.mp4")
  codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
  with av.open(str(tmp), "w", format="mp4") as out:
    stream = out.add_stream(codec, rate=fractions.Fraction(fps).limit_denominator(1001))
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    if codec == "libx264":
      stream.options = {"qp": str(qp), "preset": "veryfast", "threads": str(threads)}
    else:
      stream.options = {"qscale": "2", "threads": str(threads)}
    stream.codec_context.time_base = fractions.Fraction(1, 1) / stream.codec_context.framerate
    for i in range(t):
      frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
      frame.pts = i  # explicit timestamps: x264's rate control must not see run-dependent ones
      for packet in stream.encode(frame):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)
  os.replace(tmp, path)

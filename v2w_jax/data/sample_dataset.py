"""A small synthetic dataset in the reference layout, made locally in seconds (no downloads).

``DATASET/videos/*.mp4`` hold moving, rotating coloured shapes over a drifting gradient (H.264
yuv420p through PyAV's bundled ffmpeg), ``DATASET/metas/<stem>.txt`` the caption, and
``DATASET/text_embeddings/`` their embeddings in the store format of :mod:`v2w_jax.data.text`.

The embeddings come from :func:`toy_text_embedding`, a STAND-IN for the Cosmos-Reason1.1 encoder:
a fixed-seed random projection of hashed byte n-gram features, standardised per token like the
real pipeline. It lets the toy config train end to end on CPU; it carries no language
understanding and must not be used for real runs (use ``tools/compute_text_embeddings.py``).
Everything is deterministic for a seed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import zlib

import numpy as np

from v2w_jax.data import text as text_lib
from v2w_jax.user_errors import UserError
from v2w_jax.data.video import write_mp4

DEFAULT_CAPTION = "A video of sks teal robot."
TOY_ENCODER = "toy-hashed-ngram-projection-v1 (stand-in, NOT Cosmos-Reason1.1)"

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SampleSpec:
  """What to make; defaults fit configs/tiny.py (9-frame windows at 32x48, 16 x 48 embeddings).

  The clips are twice the training size, so loading exercises the reference's resize (and
  decord 0.6 cannot decode 48-pixel-wide H.264; see ``video.decode_clip``).
  """

  num_videos: int = 4
  frames: int = 24  # longer than num_frames so random windows differ
  height: int = 64
  width: int = 96
  fps: int = 16
  captions: tuple[str, ...] = (DEFAULT_CAPTION,)  # cycled over the videos
  text_tokens: int = 16
  text_width: int = 48
  seed: int = 0
  qp: int = 12  # H.264 constant quantiser (lower = better)


# ----------------------------------------------------------------------------------------------
# Frames.


def render_frames(num_frames: int, height: int, width: int, seed: int) -> np.ndarray:
  """Deterministic uint8 frames [T, H, W, 3]: a drifting gradient, a bouncing disc, a rotating bar."""
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij")
  base_a, base_b = rng.uniform(30, 120, 3), rng.uniform(30, 120, 3)
  disc_color, bar_color, box_color = rng.uniform(150, 255, (3, 3))
  pos = rng.uniform(0.2, 0.8, 2) * (height, width)
  vel = rng.uniform(-1.0, 1.0, 2) * (height, width) / 12.0
  radius = 0.18 * min(height, width)
  omega = rng.uniform(0.15, 0.35) * rng.choice((-1.0, 1.0))
  center = np.array([height, width], np.float32) / 2
  box = rng.uniform(0.1, 0.5, 2) * (height, width)
  box_vel = rng.uniform(-0.5, 0.5, 2) * (height, width) / 16.0
  frames = np.empty((num_frames, height, width, 3), np.uint8)
  for t in range(num_frames):
    phase = (xx / width + yy / height + 0.05 * t) % 1.0
    img = base_a[None, None] + (base_b - base_a)[None, None] * phase[..., None]
    # Bouncing disc.
    p = pos + vel * t
    for ax, size in enumerate((height, width)):
      p[ax] = np.abs(((p[ax] - radius) % (2 * (size - 2 * radius))) - (size - 2 * radius)) + radius
    img[(yy - p[0]) ** 2 + (xx - p[1]) ** 2 <= radius**2] = disc_color
    # Rotating bar through the centre.
    ang = omega * t
    along = (xx - center[1]) * np.cos(ang) + (yy - center[0]) * np.sin(ang)
    across = -(xx - center[1]) * np.sin(ang) + (yy - center[0]) * np.cos(ang)
    img[(np.abs(along) <= 0.4 * min(height, width)) & (np.abs(across) <= max(1.0, 0.06 * min(height, width)))] = bar_color
    # Drifting square (wraps around).
    b = (box + box_vel * t) % (height, width)
    side = 0.2 * min(height, width)
    dy, dx = (yy - b[0]) % height, (xx - b[1]) % width
    img[(dy < side) & (dx < side)] = box_color
    frames[t] = np.clip(img, 0, 255).astype(np.uint8)
  return frames


# ----------------------------------------------------------------------------------------------
# Stand-in text encoder.


def _hashed(table: np.ndarray, key: bytes) -> np.ndarray:
  return table[zlib.crc32(key) % table.shape[0]]


def toy_text_embedding(caption: str, tokens: int, width: int, seed: int = 0) -> np.ndarray:
  """A deterministic [tokens, width] bf16 "embedding" of ``caption`` (stand-in encoder).

  Token i is the i-th whitespace word (then pad rows). Its feature is a sum of fixed random
  vectors for its byte 1-3-grams, for the (previous word, word) pair and for its position; pad
  rows get a pad vector plus the mean of the word rows (causal pads see the prompt in the real
  encoder, too). Each row is then standardised (unbiased std), as the Reason1 pipeline does.
  """
  table = np.random.default_rng(np.random.SeedSequence([seed, 0x7E47])).standard_normal((4096, width)).astype(np.float32)
  words = [w.encode("utf-8") for w in caption.split()][:tokens]
  h = np.zeros((tokens, width), np.float32)
  prev = b"<s>"
  for i, word in enumerate(words):
    grams = [word[j : j + n] for n in (1, 2, 3) for j in range(len(word) - n + 1)]
    for g in grams:
      h[i] += _hashed(table, b"g:" + g) / np.sqrt(len(grams))
    h[i] += _hashed(table, b"w:" + prev + b"|" + word)
    prev = word
  prompt = h[: len(words)].mean(axis=0) if words else np.zeros(width, np.float32)
  for i in range(tokens):
    h[i] += 0.5 * _hashed(table, b"p:%d" % i)
    if i >= len(words):
      h[i] += _hashed(table, b"<pad>") + prompt
  return text_lib.standardize_tokens(h).astype(text_lib.BF16)


# ----------------------------------------------------------------------------------------------
# The dataset.


OWNER_MARKER = ".v2w_sample_dataset"  # written first: the folder is ours to (re)build
COMPLETE_MARKER = ".complete"  # written last: the folder holds a finished sample dataset


class NotASampleDatasetFolder(UserError):
  """The folder chosen for the sample dataset holds other files; nothing was written into it."""


def _claim_folder(out: pathlib.Path) -> None:
  """Refuses a folder that holds anything but a sample dataset (a user's own clips, a mistyped path)."""
  if out.exists() and not out.is_dir():
    raise NotASampleDatasetFolder(f"{out}: not a folder; the sample dataset needs a new or empty folder")
  if out.is_dir() and not (out / OWNER_MARKER).is_file() and not (out / COMPLETE_MARKER).is_file():
    if any(out.iterdir()):
      raise NotASampleDatasetFolder(
          f"{out}: the folder holds files that are not a synthetic sample dataset; refusing to write "
          "synthetic clips into it. Give the sample dataset a new or empty folder")
  out.mkdir(parents=True, exist_ok=True)
  (out / OWNER_MARKER).write_text("synthetic sample dataset written by v2w_jax.data.sample_dataset\n")


def make_sample_dataset(
    out_dir: str | os.PathLike,
    spec: SampleSpec = SampleSpec(),
    *,
    embeddings_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
  """Writes videos/, metas/ and text_embeddings/ (or ``embeddings_dir``) under ``out_dir``.

  ``out_dir`` must be new, empty or an earlier sample dataset (its marker file says so): a folder
  holding anything else is refused with :class:`NotASampleDatasetFolder`, even with ``overwrite``.
  Without ``overwrite`` a complete sample dataset (a ``.complete`` marker written last) is kept as
  it is; an incomplete one (an interrupted earlier call) is rebuilt.
  """
  out = pathlib.Path(out_dir)
  if (out / COMPLETE_MARKER).is_file() and not overwrite:
    return out
  if spec.num_videos <= 0 or spec.frames <= 0:
    raise ValueError(f"need num_videos > 0 and frames > 0, got {spec}")
  _claim_folder(out)
  (out / COMPLETE_MARKER).unlink(missing_ok=True)
  (out / "videos").mkdir(parents=True, exist_ok=True)
  (out / "metas").mkdir(parents=True, exist_ok=True)
  captions = []
  for i in range(spec.num_videos):
    stem = f"sample_{i:04d}"
    frames = render_frames(spec.frames, spec.height, spec.width, seed=spec.seed * 100003 + i)
    write_mp4(out / "videos" / f"{stem}.mp4", frames, spec.fps, qp=spec.qp)
    caption = spec.captions[i % len(spec.captions)]
    (out / "metas" / f"{stem}.txt").write_text(caption + "\n")
    captions.append(caption)
  store = text_lib.TextEmbeddingStore(text_lib.default_store_dir(out, embeddings_dir))
  distinct = sorted(set(captions))
  store.write(
      ((c, toy_text_embedding(c, spec.text_tokens, spec.text_width, seed=spec.seed)) for c in distinct),
      encoder=TOY_ENCODER,
  )
  (out / COMPLETE_MARKER).write_text("ok\n")
  _log.info("wrote a sample dataset of %d videos to %s", spec.num_videos, out)
  return out


def spec_for_config(config, **overrides) -> SampleSpec:
  """A SampleSpec whose sizes fit ``config`` (video_size, text_tokens, embedding width)."""
  h, w = (int(s) for s in config.data.video_size)
  num_frames = int(config.data.num_frames)
  fields = dict(
      height=2 * h,
      width=2 * w,
      frames=max(num_frames + 15, int(num_frames * 1.5)),
      text_tokens=int(config.data.text_tokens),
      text_width=int(config.model.crossattn_proj_in_channels),
  )
  fields.update(overrides)
  return SampleSpec(**fields)


def _same_folder(a: str, b: str) -> bool:
  return bool(a) and bool(b) and os.path.abspath(a) == os.path.abspath(b)


def ensure_sample_dataset(config, **overrides) -> pathlib.Path | None:
  """Makes the sample dataset in ``config.data.sample_dataset_dir`` when a split reads from it.

  With ``data.make_sample_dataset``, the synthetic clips go only into their own folder
  (``data.sample_dataset_dir``), and only when ``data.dataset_dir`` or ``data.val_dataset_dir`` is
  that folder: a dataset folder named by the user is read, never written. The embeddings go into
  the sample folder's own ``text_embeddings/`` (never a store named by ``data.embeddings_dir``).
  Returns the folder, or None when no split reads from it.
  """
  d = config.data
  folder = str(d.get("sample_dataset_dir", "") or "")
  if not d.get("make_sample_dataset", False) or not folder:
    return None
  trains_on_it = _same_folder(folder, d.dataset_dir)
  if not (trains_on_it or _same_folder(folder, d.get("val_dataset_dir", ""))):
    return None
  if not trains_on_it:
    _log.warning("training on %s but validating on the synthetic sample dataset %s: set "
                 "--config.data.val_dataset_dir (or --config.trainer.run_validation=False)", d.dataset_dir, folder)
  try:
    return make_sample_dataset(folder, spec_for_config(config, **overrides))
  except NotASampleDatasetFolder as err:
    raise NotASampleDatasetFolder(f"data.sample_dataset_dir={err}") from err

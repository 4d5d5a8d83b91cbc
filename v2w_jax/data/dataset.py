"""The training input pipeline: video files → decoded windows + text embeddings → grain batches.

Dataset layout (the reference's)::

    DATASET/videos/<stem>.mp4        clips, sorted by name
    DATASET/metas/<stem>.txt         caption (stripped)
    DATASET/text_embeddings/         one embedding per distinct caption (v2w_jax.data.text)

Pipeline (grain)::

    MapDataset(records) → shuffle(seed), a new permutation every epoch (the reference repeats
    epoch 0's forever) → repeat → map(decode a random window + load the embedding; the window's
    rng is derived from (seed, epoch, file index)) → this process's contiguous block of each
    global batch (ProcessBlocks) → batch(global_batch / process_count) → to_iter_dataset →
    mp_prefetch(num_workers)

Batching happens before the worker split, so each worker builds whole batches and the batch
stream is the same for any ``num_workers``. The global stream of samples does not depend on the
process count either. Iterator state (``get_state``/``set_state``, or orbax through
``grain.checkpoint.CheckpointSave``/``CheckpointRestore``) resumes at the exact next batch.

Bad clips: the start-up check (``data.check_at_start``; with ``data.check_decode`` it also decodes
each clip's last frame, which a truncated clip fails although its header lists every frame) names
every bad file, and either stops or (``data.skip_bad_files``) leaves them out. A window that still
fails to load at run time (damage inside a clip, a file changed during training) stops training
naming the file, or with ``skip_bad_files`` is replaced by another clip drawn from that sample's own
generator. The replacement, not a "known bad" list, keeps the stream exact: whether a window decodes
depends only on the file and the window, so every worker count, process count and resumed run makes
the same batches. The file is named in the log once per process; every replacement is counted
(``VideoBatchIterator.num_skipped``, the trainer's ``data_skipped`` metric).

Batch (numpy, host-local): ``video`` uint8 [B,3,T,H,W]; ``text_embeddings`` bf16 [B,N,D];
``padding_mask`` float32 [B,1,H,W] zeros; ``fps`` float32 [B]; ``index`` int32 [B] (position of
the clip in the dataset's sorted file list).

With ``data.latent_cache.dir`` set, the same pipeline maps records to cached windows instead
(``data/latent_cache.py``): ``latents`` (the VAE means, [B,z,t,h,w]) and ``window_start`` int32 [B]
replace ``video``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from v2w_jax.data import text as text_lib
from v2w_jax.data import video as video_lib
from v2w_jax.user_errors import UserError

_log = logging.getLogger(__name__)

_SKIPPED = "_num_skipped"  # per-sample bookkeeping, removed from the batch by the iterator
_MAX_REPLACEMENTS = 16


class DataError(UserError, RuntimeError):
  """The dataset cannot be used; the message names the files and what is wrong."""


# ----------------------------------------------------------------------------------------------
# Files.


def list_videos(dataset_dir: str | os.PathLike) -> list[pathlib.Path]:
  """Sorted ``DATASET/videos/*.mp4``; raises DataError for a missing or empty folder."""
  root = pathlib.Path(dataset_dir)
  if not root.is_dir():
    raise DataError(f"{root}: dataset folder does not exist")
  videos_dir = root / "videos"
  if not videos_dir.is_dir():
    raise DataError(f"{root}: no videos/ folder (expected DATASET/videos/*.mp4 and DATASET/metas/*.txt)")
  videos = sorted(p for p in videos_dir.iterdir() if p.suffix == ".mp4" and not p.name.startswith("."))
  if not videos:
    raise DataError(f"{videos_dir}: no .mp4 files")
  return videos


def caption_path(video_path: str | os.PathLike) -> pathlib.Path:
  """``DATASET/metas/<stem>.txt`` for ``DATASET/videos/<stem>.mp4``."""
  p = pathlib.Path(video_path)
  return p.parent.parent / "metas" / f"{p.stem}.txt"


def read_caption(video_path: str | os.PathLike) -> str:
  """The stripped caption of a video; raises DataError when missing or unreadable."""
  path = caption_path(video_path)
  try:
    return path.read_text(encoding="utf-8").strip()
  except FileNotFoundError as e:
    raise DataError(f"{video_path}: caption file {path} is missing") from e
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"{video_path}: caption file {path} is unreadable ({e})") from e


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """The data settings the pipeline needs, read from a config (``config.data`` + model width)."""

  dataset_dir: str
  embeddings_dir: str
  num_frames: int
  video_size: tuple[int, int]
  text_tokens: int
  text_width: int
  global_batch_size: int
  num_workers: int = 0
  prefetch_buffer_size: int = 2
  skip_bad_files: bool = False
  check_at_start: bool = True
  check_decode: bool = True
  decode_threads: int = 2
  latent_cache_dir: str = ""  # "" = decode windows; else read cached latents from here

  @classmethod
  def from_config(cls, config: Any, split: str = "train") -> "DataSpec":
    d = config.data
    if split == "train":
      dataset_dir = d.dataset_dir
    elif split in ("val", "validation"):
      dataset_dir = d.get("val_dataset_dir", "")
      if not dataset_dir:
        raise DataError("config.data.val_dataset_dir is empty: no validation dataset configured")
    else:
      raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    # A store is keyed by caption, so a configured embeddings_dir serves both splits.
    embeddings_dir = d.get("embeddings_dir", "")
    # Validation reads a few batches per evaluation from a fresh loader: worker processes would
    # be spawned each time for little work, so it runs inline unless data.val_num_workers says so.
    num_workers = d.get("num_workers", 0) if split == "train" else d.get("val_num_workers", 0)
    cache = d.get("latent_cache", None)
    latent_cache_dir = cache.get("dir" if split == "train" else "val_dir", "") if cache is not None else ""
    return cls(
        dataset_dir=str(dataset_dir),
        embeddings_dir=str(text_lib.default_store_dir(dataset_dir, embeddings_dir)),
        num_frames=int(d.num_frames),
        video_size=tuple(int(s) for s in d.video_size),
        text_tokens=int(d.text_tokens),
        text_width=int(config.model.crossattn_proj_in_channels),
        global_batch_size=int(d.global_batch_size),
        num_workers=int(num_workers),
        prefetch_buffer_size=int(d.get("prefetch_buffer_size", 2)),
        skip_bad_files=bool(d.get("skip_bad_files", False)),
        check_at_start=bool(d.get("check_at_start", True)),
        check_decode=bool(d.get("check_decode", True)),
        decode_threads=int(d.get("decode_threads", 2)),
        latent_cache_dir=str(latent_cache_dir),
    )


# ----------------------------------------------------------------------------------------------
# One sample.


@dataclasses.dataclass(frozen=True)
class VideoRecord:
  index: int  # position in the sorted file list (stable id, reported in batches)
  path: str


class LoadSample:
  """Decodes a random window of a record and loads its caption embedding (picklable for workers)."""

  def __init__(self, spec: DataSpec, records: Sequence[VideoRecord], seed: int):
    self.spec = spec
    self.records = tuple(records)
    self.seed = int(seed)
    self._store: text_lib.TextEmbeddingStore | None = None
    self._reported: set[str] = set()  # files already named in the log by this process

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_store"] = None  # re-read the index in each worker
    return state

  @property
  def store(self) -> text_lib.TextEmbeddingStore:
    if self._store is None:
      self._store = text_lib.TextEmbeddingStore(self.spec.embeddings_dir)
    return self._store

  def load(self, record: VideoRecord, rng: np.random.Generator) -> dict[str, Any]:
    """One sample; raises DataError / VideoError / EmbeddingError naming the file."""
    s = self.spec
    caption = read_caption(record.path)
    emb = self.store.load(caption, s.text_tokens, s.text_width)
    clip = video_lib.decode_clip(record.path, s.num_frames, rng, size=s.video_size, num_threads=s.decode_threads)
    return {
        "video": clip.video,
        "text_embeddings": emb,
        "padding_mask": np.zeros((1, *s.video_size), np.float32),
        "fps": np.float32(clip.fps),
        "index": np.int32(record.index),
    }

  def __call__(self, position: int, item: tuple[int, VideoRecord]) -> dict[str, Any]:
    """Sample at global stream ``position`` (epoch = position // #records) for ``item``."""
    slot, record = item
    epoch = position // len(self.records)
    rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, record.index]))
    skipped = 0
    while True:
      try:
        sample = self.load(record, rng)
        sample[_SKIPPED] = np.int32(skipped)
        return sample
      except (DataError, video_lib.VideoError, text_lib.EmbeddingError, OSError, ValueError) as e:
        what = str(e) if str(e).startswith(record.path) else f"{record.path}: {e}"
        if not self.spec.skip_bad_files:
          raise DataError(f"bad training sample {what}") from e
        skipped += 1
        if record.path not in self._reported:
          self._reported.add(record.path)
          _log.warning("replacing bad training sample %s (this file is not named again; every replacement "
                       "counts in the data_skipped metric)", what)
        if skipped > _MAX_REPLACEMENTS or len(self.records) < 2:
          raise DataError(f"gave up after {skipped} bad files in a row; last: {what}") from e
        # A deterministic replacement: another record, drawn from this sample's generator.
        other = int(rng.integers(0, len(self.records) - 1))
        record = self.records[other + (other >= slot)]
        slot = other + (other >= slot)


# ----------------------------------------------------------------------------------------------
# The pipeline.


class ProcessBlocks(grain.MapDataset):
  """This process's contiguous block of every global batch of the sample stream.

  Global batch g holds stream positions [g·B, (g+1)·B); process p takes [g·B + p·b, g·B + (p+1)·b)
  with b = B / processes. Assembled in process order (``make_array_from_process_local_data``), the
  global batch is then the single-process batch sample for sample, position for position, so
  per-position randomness (noise, conditional frames, caption dropout) does not depend on the
  process count.
  """

  def __init__(self, parent: grain.MapDataset, process_index: int, process_count: int, local_batch: int):
    super().__init__(parent)
    self._local = local_batch
    self._global = local_batch * process_count
    self._offset = process_index * local_batch

  def __len__(self) -> int:
    return len(self._parent) // self._global * self._local

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    batch, within = divmod(index, self._local)
    return self._parent[batch * self._global + self._offset + within]


def build_dataset(
    spec: DataSpec,
    records: Sequence[VideoRecord],
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    load: LoadSample | None = None,
) -> grain.IterDataset:
  """The grain pipeline over ``records`` for one process (see the module docstring).

  ``load`` maps (stream position, record) to a sample: default a decoded window (:class:`LoadSample`).
  """
  if not records:
    raise DataError(f"{spec.dataset_dir}: no usable videos")
  if spec.global_batch_size % process_count:
    raise DataError(
        f"global_batch_size {spec.global_batch_size} is not divisible by the {process_count} JAX processes"
    )
  local_batch = spec.global_batch_size // process_count
  load = load if load is not None else LoadSample(spec, records, seed)
  ds = grain.MapDataset.source([(i, r) for i, r in enumerate(records)])
  ds = ds.shuffle(seed=seed).repeat()
  ds = ds.map_with_index(load)
  ds = ProcessBlocks(ds, process_index, process_count, local_batch)
  ds = ds.batch(local_batch, drop_remainder=True)
  if spec.num_workers > 0:
    _ensure_absl_flags_parsed()
    read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    it_ds = ds.to_iter_dataset(read)
    return it_ds.mp_prefetch(
        grain.MultiprocessingOptions(
            num_workers=spec.num_workers, per_worker_buffer_size=max(1, spec.prefetch_buffer_size)
        )
    )
  threads = 1 if spec.prefetch_buffer_size > 0 else 0
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=spec.prefetch_buffer_size))


def _ensure_absl_flags_parsed() -> None:
  """grain's worker processes read absl flags; outside ``absl.app`` (pytest, notebooks) mark the
  defaults as parsed, or the first batch fails with UnparsedFlagAccessError."""
  from absl import flags  # pylint: disable=import-outside-toplevel

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class VideoBatchIterator(grain.DatasetIterator):
  """The loader's iterator: host-local numpy batches (or global jax.Arrays with ``sharding``).

  A grain ``DatasetIterator``: ``get_state``/``set_state`` resume at the exact next batch, and it
  can be handed to ``grain.checkpoint.CheckpointSave``/``CheckpointRestore`` inside an orbax
  ``Composite``. ``num_bad_files`` counts files excluded by the start-up check,
  ``num_skipped`` bad files met while loading (both only with ``skip_bad_files``).
  """

  def __init__(self, parent: grain.DatasetIterator, *, sharding: Any = None, report: Any = None):
    super().__init__(parent)
    self._sharding = sharding
    self.report = report
    self.num_bad_files = len(report.problems) if report is not None else 0
    self.num_skipped = 0

  def __next__(self) -> dict[str, Any]:
    batch = dict(next(self._parent))
    skipped = batch.pop(_SKIPPED, None)
    if skipped is not None:
      self.num_skipped += int(np.sum(skipped))
    if self._sharding is not None:
      return to_global_batch(batch, self._sharding)
    return batch

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)

  def close(self) -> None:
    close = getattr(self._parent, "close", None)
    if close is not None:
      close()


def to_global_batch(batch: Mapping[str, np.ndarray], sharding: Any) -> dict[str, Any]:
  """Assembles host-local batches of all processes into global jax.Arrays.

  ``sharding`` (one Sharding for every key, or a mapping key → Sharding) is the trainer's batch
  sharding, e.g. ``NamedSharding(mesh, P(("data", "fsdp")))``: a spec naming only the leading
  axis shards the batch dimension and replicates the rest, whatever the rank.
  """
  import jax  # pylint: disable=import-outside-toplevel

  out = {}
  for key, value in batch.items():
    s = sharding[key] if isinstance(sharding, Mapping) else sharding
    out[key] = jax.make_array_from_process_local_data(s, np.asarray(value))
  return out


def make_records(spec: DataSpec, report: Any = None) -> list[VideoRecord]:
  """Records of all videos (or of the good ones of a check report)."""
  videos = list_videos(spec.dataset_dir)
  bad = {p.path for p in report.problems} if report is not None else set()
  return [VideoRecord(i, str(v)) for i, v in enumerate(videos) if str(v) not in bad]


def make_loader(
    config: Any,
    *,
    split: str = "train",
    seed: int | None = None,
    start_state: dict[str, Any] | None = None,
    sharding: Any = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> VideoBatchIterator:
  """The training (or validation) iterator for ``config``.

  Args:
    config: the experiment config (``config.data``, ``config.model.crossattn_proj_in_channels``).
    split: ``train`` (``data.dataset_dir``) or ``val`` (``data.val_dataset_dir``).
    seed: pipeline seed (default ``config.seed``; ``val`` adds 1).
    start_state: a state from ``get_state()`` to resume from.
    sharding: if given, batches come back as global jax.Arrays with this sharding.
    process_index, process_count: default ``jax.process_index()/process_count()``.

  Raises:
    DataError: the dataset folder is unusable, or (without ``data.skip_bad_files``) the start-up
      check found bad files — the message lists every one and what is wrong; or the latent cache
      (``data.latent_cache.dir`` / ``val_dir``) does not fit the config or lacks clips.
  """
  from v2w_jax.data import check as check_lib  # pylint: disable=import-outside-toplevel

  spec = DataSpec.from_config(config, split)
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel

    process_index, process_count = jax.process_index(), jax.process_count()
  if seed is None:
    seed = int(config.get("seed", 0)) + (0 if split == "train" else 1)
  report = None
  if spec.check_at_start:
    report = check_lib.check_dataset(spec.dataset_dir, config, spec=spec, decode=spec.check_decode)
    if report.problems:
      if not spec.skip_bad_files:
        raise DataError(report.format())
      _log.warning("skipping %d bad files:\n%s", len(report.problems), report.format())
  records = make_records(spec, report)
  load = None
  if spec.latent_cache_dir:  # cached VAE latents instead of decoded windows; checked against the config
    from v2w_jax.data import latent_cache  # pylint: disable=import-outside-toplevel

    load = latent_cache.open_for_training(config, spec, records, seed)
  ds = build_dataset(spec, records, seed=seed, process_index=process_index, process_count=process_count, load=load)
  it = VideoBatchIterator(iter(ds), sharding=sharding, report=report)
  if start_state is not None:
    it.set_state(start_state)
  return it

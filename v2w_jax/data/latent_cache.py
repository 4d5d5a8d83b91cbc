"""Latent cache: the VAE means of K windows per clip, encoded once, read by the loader instead of pixels.

Decoding, resizing and VAE-encoding a 93x704x1280 window costs every training iteration about an
eighth of the step, and for a fixed clip set it recomputes the same windows every epoch.
``tools/cache_latents.py`` (:mod:`v2w_jax.data.latent_cache_build`) encodes K windows per clip once;
with ``data.latent_cache.dir`` set the loader then draws one of a clip's cached windows per sample
(:class:`LoadCachedSample`: same grain pipeline, seeds and resumable state as the online path) and
the trainer only normalises it on device.

What is stored is the VAE's posterior mean in the VAE's compute dtype (bf16 for the recipe), before
the latent normalisation (``models/vae.encode_mean``): the online encode is
``normalize_latents(encode_mean(...))``, so the step sees the latents the online path computes for
the window -- bit for bit on CPU when each device encodes one clip, as the recipe trains and as the
cache encodes (a convolution may round a clip differently next to others in a batch; on GPUs XLA
autotunes convolution algorithms per process, which can round differently, online too).

Layout (zarr v2 arrays through tensorstore, on a local or shared POSIX file system)::

    CACHE/cache.json       header: format, the values that shape the latents (num_frames,
                           video_size, the VAE's architecture and dtype, latent shape), the VAE
                           weights fingerprint (convert/params_io.fingerprint), windows_per_clip
    CACHE/clips/<stem>/    one entry per clip: a zarr array [windows, z, t, h, w], one chunk (one
                           record) per window; its .zattrs hold clip name, window starts, fps,
                           total frames, caption hash, VAE fingerprint and the shape values
    CACHE/.tmp/p<N>/       entries being written by process N

An entry is written under ``.tmp/`` and renamed into ``clips/`` once complete, so a killed build never
leaves a half-written entry; the next build removes its leftovers and encodes only the missing clips.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import uuid
from typing import Any, Mapping, Sequence

import numpy as np

from v2w_jax.data import dataset as dataset_lib
from v2w_jax.data import text as text_lib

FORMAT = "v2w_jax.latent_cache.v1"
HEADER_NAME = "cache.json"
ENTRIES_DIRNAME = "clips"
TMP_DIRNAME = ".tmp"
ATTRS_NAME = ".zattrs"  # the zarr v2 place for an array's user attributes
DEFAULT_DIRNAME = "latent_cache"
SHAPE_KEYS = ("num_frames", "video_size", "vae", "latent_shape", "dtype")
HEADER_KEYS = (*SHAPE_KEYS, "vae_fingerprint", "windows_per_clip")
_ZARR_DTYPES = {"bfloat16": "bfloat16", "float32": "<f4"}
_MAX_NAMED = 5  # clips named in a one-line error before "and N more"
_MAX_OPEN = 256  # open entries kept per process (a worker reads many clips, each a few times per epoch)


class LatentCacheError(dataset_lib.DataError):
  """The latent cache cannot be used for this run; the message says what differs and what to do."""


# ----------------------------------------------------------------------------------------------
# What shapes the latents.


def shape_fields(config: Any) -> dict[str, Any]:
  """The config values that determine the cached latents (JSON types), compared with a cache's."""
  from v2w_jax.models import vae as vae_lib  # pylint: disable=import-outside-toplevel

  vae = vae_lib.VAEConfig.from_config(config.vae)
  num_frames = int(config.data.num_frames)
  h, w = (int(s) for s in config.data.video_size)
  sf = vae.spatial_factor
  arch = dict(base_dim=vae.base_dim, z_dim=vae.z_dim, dim_mult=list(vae.dim_mult),
              num_res_blocks=vae.num_res_blocks, temporal_downsample=list(vae.temporal_downsample),
              dtype=vae.dtype)
  latent_shape = [vae.z_dim, 1 + (num_frames - 1) // vae.temporal_factor, h // sf, w // sf]
  return _json(dict(num_frames=num_frames, video_size=[h, w], vae=arch, latent_shape=latent_shape,
                    dtype=str(vae.dtype)))


def make_header(config: Any, vae_fingerprint: str, windows_per_clip: int) -> dict[str, Any]:
  return dict(format=FORMAT, **shape_fields(config), vae_fingerprint=vae_fingerprint,
              windows_per_clip=int(windows_per_clip))


def differences(have: Mapping[str, Any], want: Mapping[str, Any], keys: Sequence[str] = SHAPE_KEYS) -> list[str]:
  """``"name <have> (config <want>)"`` for every differing key (nested dicts compared per field)."""
  out = []
  for key in keys:
    a, b = have.get(key), want.get(key)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
      out += [f"{key}.{d}" for d in differences(a, b, sorted(set(a) | set(b)))]
    elif a != b:
      out.append(f"{key} {a} (config {b})")
  return out


def _json(value: Any) -> Any:
  """The value as it reads back from JSON (tuples become lists), so comparisons are like for like."""
  return json.loads(json.dumps(value))


def configured_dirs(config: Any) -> list[str]:
  """The latent-cache folders a run reads: ``data.latent_cache.dir`` and, with a validation set, ``val_dir``."""
  cache = config.data.get("latent_cache", None)
  if cache is None:
    return []
  dirs = [cache.get("dir", "")]
  if config.data.get("val_dataset_dir", ""):
    dirs.append(cache.get("val_dir", ""))
  return [str(d) for d in dirs if d]


def _names(stems: Sequence[str]) -> str:
  shown = ", ".join(stems[:_MAX_NAMED])
  return shown + (f" and {len(stems) - _MAX_NAMED} more" if len(stems) > _MAX_NAMED else "")


# ----------------------------------------------------------------------------------------------
# The store.


def _atomic_write_text(path: pathlib.Path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


class LatentCache:
  """One cache folder: header, committed entries, window reads (tensorstore) and atomic entry writes.

  Picklable for grain's worker processes: open arrays are not carried over, each worker opens its own.
  """

  def __init__(self, root: str | os.PathLike):
    self.root = pathlib.Path(root)
    self._arrays: dict[str, Any] = {}

  def __getstate__(self):
    return {"root": self.root, "_arrays": {}}

  @property
  def header_path(self) -> pathlib.Path:
    return self.root / HEADER_NAME

  @property
  def entries_dir(self) -> pathlib.Path:
    return self.root / ENTRIES_DIRNAME

  def entry_path(self, stem: str) -> pathlib.Path:
    return self.entries_dir / stem

  def tmp_dir(self, process_index: int) -> pathlib.Path:
    return self.root / TMP_DIRNAME / f"p{process_index}"

  # -- header ----------------------------------------------------------------------------------

  def header(self) -> dict[str, Any]:
    if not self.header_path.is_file():
      raise LatentCacheError(f"{self.root}: no latent cache here ({HEADER_NAME} missing): build it with "
                             "`python tools/cache_latents.py DATASET --config=CONFIG --out=" + str(self.root) + "`")
    try:
      header = json.loads(self.header_path.read_text())
    except (OSError, ValueError) as e:
      raise LatentCacheError(f"{self.header_path}: unreadable latent-cache header ({e})") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
      raise LatentCacheError(f"{self.header_path}: not a {FORMAT} header")
    return header

  def check_header(self, header: Mapping[str, Any], keys: Sequence[str] = HEADER_KEYS) -> bool:
    """Whether a header exists; raises LatentCacheError when it differs from ``header`` in ``keys``."""
    if not self.header_path.is_file():
      return False
    diffs = differences(self.header(), _json(dict(header)), keys)
    if diffs:
      raise LatentCacheError(
          f"{self.root} holds latents of another setting ({'; '.join(diffs)}): choose a new --out folder, "
          "or delete this one to rebuild it")
    return True

  def write_header(self, header: Mapping[str, Any]) -> None:
    """Writes the header, or checks an existing one: a cache holds the latents of one setting."""
    if not self.check_header(header):
      _atomic_write_text(self.header_path, json.dumps(_json(dict(header)), indent=1))

  # -- entries ---------------------------------------------------------------------------------

  def committed(self) -> set[str]:
    """Stems of the complete entries (an entry folder exists only once complete)."""
    if not self.entries_dir.is_dir():
      return set()
    return {p.name for p in self.entries_dir.iterdir() if p.is_dir()}

  def entry_attrs(self, stem: str) -> dict[str, Any]:
    path = self.entry_path(stem) / ATTRS_NAME
    try:
      return json.loads(path.read_text())
    except (OSError, ValueError) as e:
      raise LatentCacheError(f"{path}: unreadable latent-cache entry metadata ({e})") from e

  def read_window(self, stem: str, window: int) -> np.ndarray:
    """Window ``window`` of clip ``stem``: the VAE mean [z, t, h, w] in the stored dtype."""
    try:
      arr = self._arrays.get(stem)
      if arr is None:
        import tensorstore as ts  # pylint: disable=import-outside-toplevel

        arr = ts.open(self._spec(self.entry_path(stem)), open=True, read=True).result()
        if len(self._arrays) >= _MAX_OPEN:
          self._arrays.pop(next(iter(self._arrays)))  # the oldest
        self._arrays[stem] = arr
      return arr[window].read().result()
    except Exception as e:  # tensorstore reports I/O and format errors as ValueError and others
      raise LatentCacheError(f"{self.entry_path(stem)}: cannot read cached window {window} ({e})") from e

  def write_entry(self, stem: str, means: np.ndarray, attrs: Mapping[str, Any], *, process_index: int = 0) -> None:
    """Writes clip ``stem``'s windows [K, z, t, h, w] and metadata, then commits them with one rename."""
    import tensorstore as ts  # pylint: disable=import-outside-toplevel

    tmp_root = self.tmp_dir(process_index)
    tmp = tmp_root / f"{stem}.{uuid.uuid4().hex}"
    dtype = _ZARR_DTYPES[str(attrs["dtype"])]
    metadata = {"shape": list(means.shape), "chunks": [1, *means.shape[1:]], "dtype": dtype, "compressor": None}
    arr = ts.open({**self._spec(tmp), "metadata": metadata}, create=True).result()
    arr.write(means).result()
    (tmp / ATTRS_NAME).write_text(json.dumps(_json(dict(attrs)), indent=1))
    final = self.entry_path(stem)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():  # replacing an entry: move the old one aside first (absent, never half-written)
      old = tmp_root / f"{stem}.old.{uuid.uuid4().hex}"
      os.rename(final, old)
      os.rename(tmp, final)
      shutil.rmtree(old)
    else:
      os.rename(tmp, final)

  def clear_tmp(self, process_index: int) -> int:
    """Removes this process's unfinished entries (a killed build's); returns how many there were."""
    tmp_root = self.tmp_dir(process_index)
    if not tmp_root.is_dir():
      return 0
    leftovers = list(tmp_root.iterdir())
    shutil.rmtree(tmp_root)
    return len(leftovers)

  def num_unfinished(self) -> int:
    root = self.root / TMP_DIRNAME
    return sum(1 for p in root.glob("p*/*")) if root.is_dir() else 0

  @staticmethod
  def _spec(path: pathlib.Path) -> dict[str, Any]:
    return {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)}}


# ----------------------------------------------------------------------------------------------
# Checking a cache against a config and a clip list.


@dataclasses.dataclass
class CacheReport:
  """The state of a cache for a config and a dataset (``python -m v2w_jax.data.check`` prints it)."""

  root: str
  dataset_dir: str
  num_clips: int  # clips of the dataset asked for
  entries: dict[str, dict] = dataclasses.field(default_factory=dict)  # usable cached clips -> their metadata
  setting: list[str] = dataclasses.field(default_factory=list)  # header vs config differences / header problem
  missing: list[str] = dataclasses.field(default_factory=list)
  mismatched: list[str] = dataclasses.field(default_factory=list)  # "stem: what differs"
  caption_changed: list[str] = dataclasses.field(default_factory=list)  # informational: latents still valid
  unfinished: int = 0  # entries a killed build left under .tmp/ (removed by the next build)
  vae_fingerprint: str = ""
  absent: bool = False  # no cache (header) at root

  @property
  def ok(self) -> bool:
    return not (self.setting or self.missing or self.mismatched)

  def format(self) -> str:
    windows = sum(len(a["window_starts"]) for a in self.entries.values())
    lines = [f"latent cache {self.root}: {len(self.entries)} of {self.num_clips} clips cached "
             f"({windows} windows), {len(self.missing)} missing, {len(self.mismatched)} "
             f"mismatched; VAE fingerprint {self.vae_fingerprint[:16] or '?'}"]
    lines += [f"  SETTING {d}" for d in self.setting]
    lines += [f"  MISSING {s}" for s in self.missing]
    lines += [f"  MISMATCH {m}" for m in self.mismatched]
    if self.caption_changed:
      lines.append(f"  note: the caption of {len(self.caption_changed)} clip(s) changed since caching "
                   f"({_names(self.caption_changed)}); their latents are still valid")
    if self.unfinished:
      lines.append(f"  note: {self.unfinished} unfinished entries of an interrupted build (the next build "
                   "removes them)")
    return "\n".join(lines)

  def error(self) -> str:
    """One line: what differs, and the command that fixes it."""
    build = f"`python tools/cache_latents.py {self.dataset_dir} --config=CONFIG --out={self.root}`"
    if self.absent:
      return (f"latent cache {self.root} does not exist ({HEADER_NAME} missing): build it with {build}, or set "
              "data.latent_cache.dir='' to encode online")
    parts = []
    if self.setting:
      parts.append("built for another setting: " + "; ".join(self.setting))
    if self.mismatched:
      parts.append(f"{len(self.mismatched)} entries do not fit the config ({_names(self.mismatched)})")
    if self.missing:
      parts.append(f"no latents for {len(self.missing)} of the {self.num_clips} clips of {self.dataset_dir} "
                   f"({_names(self.missing)})")
    return (f"latent cache {self.root}: " + "; ".join(parts) + f". Build it for this config with {build} (a new "
            "folder if the setting changed), or set data.latent_cache.dir='' to encode online")


def check_cache(root: str | os.PathLike, config: Any, videos: Sequence[str | os.PathLike], *,
                dataset_dir: str | os.PathLike = "") -> CacheReport:
  """Checks cache ``root`` for ``config`` and the clips ``videos``: setting, entries, missing clips."""
  cache = LatentCache(root)
  stems = [pathlib.Path(v).stem for v in videos]
  report = CacheReport(str(root), str(dataset_dir), len(stems))
  if not cache.header_path.exists():
    report.absent, report.missing = True, stems
    report.setting.append(f"no {HEADER_NAME}: not a latent cache (yet)")
    return report
  try:
    header = cache.header()
  except LatentCacheError as e:
    report.setting.append(str(e))
    report.missing = stems
    return report
  want = shape_fields(config)
  report.setting = differences(header, want)
  report.vae_fingerprint = str(header.get("vae_fingerprint", ""))
  report.unfinished = cache.num_unfinished()
  committed = cache.committed()
  for stem, video in zip(stems, videos):
    if stem not in committed:
      report.missing.append(stem)
      continue
    try:
      attrs = cache.entry_attrs(stem)
    except LatentCacheError as e:
      report.mismatched.append(f"{stem}: {e}")
      continue
    diffs = differences(attrs, header, (*SHAPE_KEYS, "vae_fingerprint"))
    if diffs:
      report.mismatched.append(f"{stem}: entry has " + "; ".join(d.replace("(config", "(cache header") for d in diffs))
      continue
    report.entries[stem] = attrs
    try:
      if text_lib.caption_key(dataset_lib.read_caption(video)) != attrs.get("caption_key"):
        report.caption_changed.append(stem)
    except dataset_lib.DataError:
      pass  # a missing caption is the dataset check's to report
  return report


def check_vae_weights(config: Any, vae_params: Any) -> None:
  """Raises LatentCacheError unless every configured cache was encoded with ``vae_params``."""
  dirs = configured_dirs(config)
  if not dirs:
    return
  from v2w_jax.convert import params_io  # pylint: disable=import-outside-toplevel

  fingerprint = params_io.fingerprint(vae_params)
  source = config.vae.checkpoint_path or f"'' (random weights from seed {config.seed + 1})"
  for root in dirs:
    have = str(LatentCache(root).header().get("vae_fingerprint", ""))
    if have != fingerprint:
      raise LatentCacheError(
          f"latent cache {root} was encoded with other VAE weights (fingerprint {have[:16]}) than this run's "
          f"config.vae.checkpoint_path={source} (fingerprint {fingerprint[:16]}): rebuild it with "
          "`python tools/cache_latents.py DATASET --config=CONFIG` and these weights, or point "
          "config.vae.checkpoint_path at the weights it was built with")


# ----------------------------------------------------------------------------------------------
# Loading samples.


class LoadCachedSample(dataset_lib.LoadSample):
  """A sample from the cache: one of the clip's windows, drawn with the sample's generator.

  The generator is the online path's (seed, epoch, clip index), so the stream is seeded and
  resumable exactly as there; ``latents`` (the VAE mean, [z, t, h, w]) replaces ``video``, and
  ``window_start`` names the cached window's first frame.
  """

  def __init__(self, spec: dataset_lib.DataSpec, records: Sequence[dataset_lib.VideoRecord], seed: int,
               cache: LatentCache, entries: Mapping[str, Mapping[str, Any]]):
    super().__init__(spec, records, seed)
    self.cache = cache
    self.entries = {stem: (tuple(int(s) for s in a["window_starts"]), float(a["fps"])) for stem, a in entries.items()}

  def load(self, record: dataset_lib.VideoRecord, rng: np.random.Generator) -> dict[str, Any]:
    s = self.spec
    emb = self.store.load(dataset_lib.read_caption(record.path), s.text_tokens, s.text_width)
    stem = pathlib.Path(record.path).stem
    starts, fps = self.entries[stem]
    window = int(rng.integers(0, len(starts)))
    return {
        "latents": self.cache.read_window(stem, window),
        "text_embeddings": emb,
        "padding_mask": np.zeros((1, *s.video_size), np.float32),
        "fps": np.float32(fps),
        "index": np.int32(record.index),
        "window_start": np.int32(starts[window]),
    }


def open_for_training(config: Any, spec: dataset_lib.DataSpec, records: Sequence[dataset_lib.VideoRecord],
                      seed: int) -> LoadCachedSample:
  """The sample loader over ``spec.latent_cache_dir``, after checking it fits the config and holds every clip.

  Raises:
    LatentCacheError: one line naming what differs (setting, entries, missing clips) and the fix.
  """
  report = check_cache(spec.latent_cache_dir, config, [r.path for r in records], dataset_dir=spec.dataset_dir)
  if not report.ok:
    raise LatentCacheError(report.error())
  return LoadCachedSample(spec, records, seed, LatentCache(spec.latent_cache_dir), report.entries)

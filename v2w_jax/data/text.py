"""Text-embedding store: one ``.npy`` per distinct caption, memory-mapped by the training loader.

The reference computes the Cosmos-Reason1.1 FULL_CONCAT embedding of every caption online
(512 tokens x 100352 features, bf16, ~103 MB). It is a pure function of the caption, so the port
computes it once per *distinct* caption (``tools/compute_text_embeddings.py``) and the loader
reads it back. Layout of a store folder (default ``DATASET/text_embeddings``)::

    index.json          {"format": FORMAT, "encoder": ..., "tokens": N, "width": D,
                         "dtype": "bfloat16", "captions": {caption: "<key>.npy", ...}}
    <key>.npy           [N, D]; bf16 stored as its uint16 bit pattern ('<u2'), or float32

``<key>`` is ``sha256(caption utf-8)`` hex[:16]. Files are written atomically (temp + rename), so a
crashed writer never leaves a half file under a final name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Iterable

import ml_dtypes
import numpy as np

from v2w_jax.atomic_file import atomic_write
from v2w_jax.user_errors import UserError

FORMAT = "v2w_jax.text_embeddings.v1"
INDEX_NAME = "index.json"
DEFAULT_DIRNAME = "text_embeddings"
BF16 = np.dtype(ml_dtypes.bfloat16)
_DTYPES = ("bfloat16", "float32")


class EmbeddingError(UserError, RuntimeError):
  """A text embedding is missing or unusable; the message names the file and the problem."""


def caption_key(caption: str) -> str:
  """File stem of a caption's embedding: the first 16 hex digits of its sha256."""
  return hashlib.sha256(caption.encode("utf-8")).hexdigest()[:16]


def default_store_dir(dataset_dir: str | os.PathLike, embeddings_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """``embeddings_dir`` when given (non-empty), else ``DATASET/text_embeddings``."""
  if embeddings_dir:
    return pathlib.Path(embeddings_dir)
  return pathlib.Path(dataset_dir) / DEFAULT_DIRNAME


def _atomic_write_bytes(path: pathlib.Path, write) -> None:
  with atomic_write(path, fsync=False) as f:
    write(f)


def _disk_dtype_name(dtype: np.dtype) -> str | None:
  """Logical dtype of an on-disk array: bf16 is stored as uint16 bits (or numpy's void '|V2')."""
  if dtype == np.dtype("<u2") or dtype == np.dtype("V2") or dtype == BF16:
    return "bfloat16"
  if dtype == np.dtype("<f4"):
    return "float32"
  return None


@dataclasses.dataclass(frozen=True)
class StoreInfo:
  encoder: str
  tokens: int
  width: int
  dtype: str


class TextEmbeddingStore:
  """Reads and writes one store folder. Cheap to construct; reads ``index.json`` once."""

  def __init__(self, root: str | os.PathLike):
    self.root = pathlib.Path(root)
    self._index: dict | None = None

  # -- index ---------------------------------------------------------------------------------

  @property
  def index_path(self) -> pathlib.Path:
    return self.root / INDEX_NAME

  def exists(self) -> bool:
    return self.index_path.is_file()

  def _load_index(self) -> dict:
    if self._index is None:
      if not self.index_path.is_file():
        raise EmbeddingError(
            f"{self.index_path}: no text-embedding index (run tools/compute_text_embeddings.py on the "
            "dataset, or tools/make_sample_dataset.py for the toy data)"
        )
      try:
        index = json.loads(self.index_path.read_text())
      except (OSError, ValueError) as e:
        raise EmbeddingError(f"{self.index_path}: unreadable index ({e})") from e
      if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("captions"), dict):
        raise EmbeddingError(f"{self.index_path}: not a {FORMAT} index")
      if index.get("dtype") not in _DTYPES:
        raise EmbeddingError(f"{self.index_path}: dtype {index.get('dtype')!r} not in {_DTYPES}")
      self._index = index
    return self._index

  def info(self) -> StoreInfo:
    index = self._load_index()
    return StoreInfo(str(index.get("encoder", "")), int(index["tokens"]), int(index["width"]), str(index["dtype"]))

  def captions(self) -> list[str]:
    return list(self._load_index()["captions"])

  def __contains__(self, caption: str) -> bool:
    return caption in self._load_index()["captions"]

  def path_for(self, caption: str) -> pathlib.Path:
    """The file of ``caption``; raises EmbeddingError when the index has no entry for it."""
    captions = self._load_index()["captions"]
    if caption not in captions:
      raise EmbeddingError(f"{self.index_path}: no embedding for caption {_short(caption)!r}")
    return self.root / captions[caption]

  # -- reading -------------------------------------------------------------------------------

  def validate(self, caption: str, tokens: int | None = None, width: int | None = None) -> str | None:
    """Returns what is wrong with ``caption``'s embedding (None when usable); reads headers only."""
    try:
      self._open(caption, tokens, width)
    except EmbeddingError as e:
      return str(e)
    return None

  def _open(self, caption: str, tokens: int | None, width: int | None) -> np.ndarray:
    path = self.path_for(caption)
    if not path.is_file():
      raise EmbeddingError(f"{path}: embedding file missing (caption {_short(caption)!r})")
    try:
      arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # pylint: disable=broad-except
      raise EmbeddingError(f"{path}: unreadable .npy ({type(e).__name__}: {e})") from e
    want = self._load_index()["dtype"]
    got = _disk_dtype_name(arr.dtype)
    if got != want:
      raise EmbeddingError(f"{path}: dtype {arr.dtype} on disk, expected {want} (index {self.index_path})")
    shape = (tokens, width) if tokens is not None and width is not None else None
    if arr.ndim != 2 or (shape is not None and arr.shape != shape):
      raise EmbeddingError(f"{path}: shape {arr.shape}, expected {shape or '[tokens, width]'}")
    return arr

  def load(self, caption: str, tokens: int | None = None, width: int | None = None) -> np.ndarray:
    """The [tokens, width] bf16 embedding of ``caption`` (memory-mapped when stored as bf16)."""
    arr = self._open(caption, tokens, width)
    if arr.dtype == np.dtype("<f4"):
      return np.asarray(arr).astype(BF16)
    return arr.view(BF16)

  # -- writing -------------------------------------------------------------------------------

  def write(self, items: Iterable[tuple[str, np.ndarray]], *, encoder: str) -> list[pathlib.Path]:
    """Writes embeddings [tokens, width] (stored as bf16) and merges them into ``index.json``.

    An existing index must agree on tokens/width/dtype; entries for other captions are kept.
    """
    index = self._load_index() if self.exists() else None
    captions = dict(index["captions"]) if index else {}
    shape = (int(index["tokens"]), int(index["width"])) if index else None
    if index and index["dtype"] != "bfloat16":
      raise EmbeddingError(f"{self.index_path}: existing store has dtype {index['dtype']}, writing bfloat16")
    written = []
    for caption, emb in items:
      emb = np.asarray(emb)
      if emb.ndim != 2:
        raise ValueError(f"embedding for {_short(caption)!r} has shape {emb.shape}, expected [tokens, width]")
      if shape is None:
        shape = emb.shape
      elif emb.shape != shape:
        raise ValueError(f"embedding for {_short(caption)!r} has shape {emb.shape}, the store holds {shape}")
      bits = np.ascontiguousarray(emb.astype(BF16)).view(np.uint16)
      name = caption_key(caption) + ".npy"
      _atomic_write_bytes(self.root / name, lambda f, b=bits: np.save(f, b, allow_pickle=False))
      captions[caption] = name
      written.append(self.root / name)
    if shape is None:
      raise ValueError("nothing to write")
    new_index = dict(
        format=FORMAT, encoder=encoder, tokens=int(shape[0]), width=int(shape[1]), dtype="bfloat16", captions=captions
    )
    payload = json.dumps(new_index, indent=1, ensure_ascii=False).encode()
    _atomic_write_bytes(self.index_path, lambda f: f.write(payload))
    self._index = new_index
    return written


def _short(caption: str, n: int = 60) -> str:
  return caption if len(caption) <= n else caption[: n - 3] + "..."


def standardize_tokens(h: np.ndarray, eps: float = 1e-8) -> np.ndarray:
  """Per-token standardisation over the last axis with the unbiased std, as the reference does."""
  h = np.asarray(h, np.float32)
  mean = h.mean(axis=-1, keepdims=True)
  std = h.std(axis=-1, ddof=1, keepdims=True)
  return (h - mean) / (std + eps)

"""Text embeddings of a generation sample: precomputed ``.npy`` files or the text-embedding store.

A sample's conditional embedding comes from its ``prompt_embedding`` file, else from the store
(``data/text.py``) by its exact prompt text. The unconditional (negative) branch uses, in order: the
sample's ``negative_prompt_embedding`` file, the store's embedding of its ``negative_prompt`` text, the
store's embedding of the reference's default negative prompt, and finally all-zero text (what the
reference's training-time sample callback uses) with a warning.

Prompts the store lacks are found up front (:meth:`EmbeddingResolver.missing_texts`): with a text
encoder folder they are embedded into the store first (:func:`embed_missing`, the same encoder as
``tools/compute_text_embeddings.py``; torch is imported only then), else they are one error that lists
them with the command computing them (:func:`missing_error`). ``check`` then validates every sample's
embeddings (file headers only) before any model is loaded.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shlex
from typing import Sequence

import ml_dtypes
import numpy as np

from v2w_jax.data import text as text_lib
from v2w_jax.inference.spec import DEFAULT_NEGATIVE_PROMPT, SampleSpec
from v2w_jax.user_errors import UserError

_log = logging.getLogger(__name__)
BF16 = np.dtype(ml_dtypes.bfloat16)


class EmbeddingError(UserError, ValueError):
  """An embedding is missing or unusable; the message names the sample / file."""


def _open(path: str | os.PathLike) -> np.ndarray:
  try:
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
  except Exception as e:  # pylint: disable=broad-except
    raise EmbeddingError(f"{path}: unreadable .npy ({type(e).__name__}: {e})") from e
  if arr.ndim == 3 and arr.shape[0] == 1:
    arr = arr[0]
  return arr


def _check_array(path: str | os.PathLike, arr: np.ndarray, width: int) -> None:
  if arr.ndim != 2 or arr.shape[0] < 1:
    raise EmbeddingError(f"{path}: embedding shape {arr.shape}, expected [tokens, {width}]")
  if arr.shape[1] != width:
    raise EmbeddingError(f"{path}: embedding width {arr.shape[1]} != the DiT's text input width {width} "
                         "(model.crossattn_proj_in_channels)")
  if arr.dtype not in (np.dtype("<f4"), np.dtype("<f2"), np.dtype("<u2"), np.dtype("V2"), BF16):
    raise EmbeddingError(f"{path}: dtype {arr.dtype}; expected float32, float16 or bfloat16 (stored as uint16)")


def load_embedding_file(path: str | os.PathLike, width: int) -> np.ndarray:
  """A [tokens, width] embedding .npy as bf16 (float32/float16, or bf16 bits stored as uint16)."""
  arr = _open(path)
  _check_array(path, arr, width)
  if arr.dtype in (np.dtype("<u2"), np.dtype("V2")):
    return np.asarray(arr).view(BF16)
  return np.asarray(arr).astype(BF16)


class EmbeddingResolver:
  """Finds the conditional and negative embeddings of samples (see the module docstring)."""

  def __init__(self, width: int, store_dir: str | os.PathLike | None = None):
    self.width = int(width)
    self.store = None
    if store_dir:
      store = text_lib.TextEmbeddingStore(store_dir)
      if store.exists():
        self.store = store
      else:
        _log.info("no text-embedding store at %s", store_dir)

  def _store_has(self, caption: str | None) -> bool:
    return self.store is not None and caption is not None and caption in self.store

  def _from_store(self, caption: str) -> np.ndarray:
    try:
      arr = np.asarray(self.store.load(caption))
    except text_lib.EmbeddingError as e:
      raise EmbeddingError(str(e)) from e
    _check_array(self.store.index_path, arr, self.width)
    return arr

  def positive_source(self, spec: SampleSpec) -> tuple[str, str]:
    """('file', path) or ('store', prompt); raises EmbeddingError when neither exists."""
    if spec.prompt_embedding:
      return "file", spec.prompt_embedding
    if self._store_has(spec.prompt):
      return "store", spec.prompt
    where = f"store {self.store.root}" if self.store is not None else "no text-embedding store (--text_embeddings_dir)"
    raise EmbeddingError(f"{spec.where}: no embedding for prompt {spec.prompt!r} ({where}); pass "
                         "'prompt_embedding' (a precomputed [tokens, D] .npy) or add the prompt to the store "
                         "with tools/compute_text_embeddings.py")

  def negative_source(self, spec: SampleSpec) -> tuple[str, str | None]:
    """('file', path), ('store', text) or ('zeros', None)."""
    if spec.negative_prompt_embedding:
      return "file", spec.negative_prompt_embedding
    if spec.negative_prompt is not None:
      if self._store_has(spec.negative_prompt):
        return "store", spec.negative_prompt
      raise EmbeddingError(f"{spec.where}: no embedding for negative_prompt {spec.negative_prompt!r} in "
                           f"{'the store ' + str(self.store.root) if self.store else 'any store'}; pass "
                           "'negative_prompt_embedding' instead")
    if self._store_has(DEFAULT_NEGATIVE_PROMPT):
      return "store", DEFAULT_NEGATIVE_PROMPT
    return "zeros", None

  def _load(self, source: tuple[str, str | None]) -> np.ndarray | None:
    kind, ref = source
    if kind == "file":
      return load_embedding_file(ref, self.width)
    if kind == "store":
      return self._from_store(ref)
    return None

  def missing_texts(self, specs: Sequence[SampleSpec], *, default_negative: bool = False) -> dict[str, list[str]]:
    """Prompt / negative-prompt texts the samples read from the store but it lacks -> the samples naming them.

    ``default_negative`` adds the reference's default negative prompt when a guided sample would fall back
    to it and the store lacks it (to compute it along, as the reference always uses it).
    """
    missing: dict[str, list[str]] = {}
    for spec in specs:
      if spec.prompt_embedding is None and spec.prompt is not None and not self._store_has(spec.prompt):
        missing.setdefault(spec.prompt, []).append(spec.where)
      if (spec.negative_prompt_embedding is None and spec.negative_prompt is not None
          and not self._store_has(spec.negative_prompt)):
        missing.setdefault(spec.negative_prompt, []).append(f"{spec.where} (negative_prompt)")
      if (default_negative and spec.guidance != 0 and spec.negative_prompt_embedding is None
          and spec.negative_prompt is None and not self._store_has(DEFAULT_NEGATIVE_PROMPT)):
        missing.setdefault(DEFAULT_NEGATIVE_PROMPT, []).append("the default negative prompt")
    return {text: list(dict.fromkeys(where)) for text, where in missing.items()}

  def check(self, specs: Sequence[SampleSpec]) -> None:
    """Validates every sample's embeddings (headers only); raises one EmbeddingError listing all problems."""
    problems = []
    for spec in specs:
      try:
        shapes = []
        for src in (self.positive_source(spec), self.negative_source(spec)):
          if src[0] == "file":
            arr = _open(src[1])
            _check_array(src[1], arr, self.width)
            shapes.append(arr.shape)
          elif src[0] == "store":
            problem = self.store.validate(src[1])
            if problem:
              raise EmbeddingError(problem)
            shapes.append((self.store.info().tokens, self.store.info().width))
            if shapes[-1][1] != self.width:
              raise EmbeddingError(f"{self.store.index_path}: embedding width {shapes[-1][1]} != the DiT's text "
                                   f"input width {self.width}")
        if len(shapes) == 2 and shapes[0][0] != shapes[1][0]:
          raise EmbeddingError(f"{spec.where}: prompt embedding has {shapes[0][0]} tokens but the negative one "
                               f"{shapes[1][0]} (both CFG branches run as one batch)")
      except EmbeddingError as e:
        msg = str(e)
        problems.append(msg if spec.where in msg else f"{spec.where}: {msg}")
    if problems:
      raise EmbeddingError("text embeddings unusable:\n  " + "\n  ".join(problems))

  def resolve(self, spec: SampleSpec) -> tuple[np.ndarray, np.ndarray | None]:
    """(conditional [L, D], negative [L, D] or None = zeros) as bf16 numpy arrays."""
    pos = self._load(self.positive_source(spec))
    neg_src = self.negative_source(spec)
    if neg_src[0] == "zeros" and spec.guidance != 0:
      _log.warning("%s: no negative prompt embedding (sample field 'negative_prompt_embedding', "
                   "--negative_prompt_embedding, or the default negative prompt in the store); the "
                   "unconditional branch uses all-zero text", spec.where)
    neg = self._load(neg_src)
    if neg is not None and neg.shape != pos.shape:
      raise EmbeddingError(f"{spec.where}: negative embedding {neg.shape} != prompt embedding {pos.shape}")
    return pos, neg


def missing_error(missing: dict[str, list[str]], store_dir: str | os.PathLike, num_tokens: int) -> EmbeddingError:
  """One error listing the prompts without an embedding, with the command that computes them."""
  lines = [f"{len(missing)} prompt(s) have no text embedding in the store {store_dir}:"]
  for text, where in missing.items():
    lines.append(f"  {_short(text)!r} ({'; '.join(where)})")
  command = ["python", "tools/compute_text_embeddings.py", "--model_dir=checkpoints/Cosmos-Reason1-7B",
             f"--out_dir={store_dir}", f"--num_tokens={num_tokens}"] + [f"--caption={t}" for t in missing]
  lines.append("compute them (with your Cosmos-Reason1 folder as --model_dir) with:")
  lines.append("  " + shlex.join(command))
  lines.append("or rerun with --text_encoder_dir=<Cosmos-Reason1 folder> to compute them first")
  return EmbeddingError("\n".join(lines))


def embed_missing(texts: Sequence[str], store_dir: str | os.PathLike, encoder_dir: str | os.PathLike,
                  num_tokens: int, width: int) -> None:
  """Embeds ``texts`` into the store with the Cosmos-Reason1 encoder at ``encoder_dir``, then frees it."""
  from v2w_jax.data import text_encoder  # pylint: disable=import-outside-toplevel

  _log.info("embedding %d prompt(s) with the text encoder %s into %s", len(texts), encoder_dir, store_dir)
  encoder = text_encoder.ReasonTextEncoder(encoder_dir, num_tokens=num_tokens)
  try:
    if encoder.width != width:
      raise EmbeddingError(f"--text_encoder_dir {encoder_dir}: the encoder makes {encoder.width}-wide embeddings, "
                           f"the DiT reads {width} (model.crossattn_proj_in_channels)")
    text_encoder.compute_store(texts, store_dir, encoder)
  finally:
    encoder.close()


def _short(text: str, n: int = 100) -> str:
  return text if len(text) <= n else text[: n - 3] + "..."


def default_store_dir(config) -> pathlib.Path | None:
  """``config.data.embeddings_dir`` or ``<config.data.dataset_dir>/text_embeddings`` (None if neither set)."""
  data = config.get("data", None) if hasattr(config, "get") else None
  if data is None:
    return None
  dataset_dir = data.get("dataset_dir", "") if hasattr(data, "get") else ""
  emb_dir = data.get("embeddings_dir", "") if hasattr(data, "get") else ""
  if not dataset_dir and not emb_dir:
    return None
  return text_lib.default_store_dir(dataset_dir or ".", emb_dir or None)

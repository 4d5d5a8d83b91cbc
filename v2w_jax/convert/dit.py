"""DiT weights: reference PyTorch state dict (``*_ema_{fp32,bf16}.pt``) <-> Flax params.

Key mapping (dit_spec §5), torch keys carry the prefix ``net.``:

  ``x_embedder.proj.1.weight``            <-> ``x_embedder/proj/kernel``
  ``t_embedder.1.linear_{1,2}.weight``     <-> ``t_embedder/linear_{1,2}/kernel``
  ``t_embedding_norm.weight``              <-> ``t_embedding_norm/scale``
  ``crossattn_proj.0.{weight,bias}``       <-> ``crossattn_proj/{kernel,bias}``
  ``blocks.{i}.<m>.weight``                <-> ``blocks/<m>/kernel[i]`` (scan) or ``blocks_{i}/<m>/kernel``
  ``...adaln_modulation*.{1,2}.weight``    <-> ``.../lora_{down,up}/kernel``
  ``final_layer.linear.weight`` ...        <-> ``final_layer/linear/kernel`` ...

Linear weights ``[out, in]`` are transposed to Flax kernels ``[in, out]``; norm weights map to ``scale``.
Recognised and dropped: ``*._extra_state`` (TransformerEngine metadata) and the ``accum_*`` training
counters. The RoPE buffers ``pos_embedder.{seq,dim_spatial_range,dim_temporal_range}`` are checked
(exact or bf16-rounded values) but not loaded: ``DiTConfig.rope_bf16_exponents`` decides the
exponents. Both directions are strict and report every bad key in one ``ValueError``.

The expected tree comes from ``jax.eval_shape`` of the model itself, so the mapping cannot drift from
the module layout. Tensors are materialised one at a time (inputs may be lazy, e.g.
``torch_pt.LazyTensor``), so converting needs memory for the output plus about one tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import ml_dtypes
import numpy as np

from v2w_jax.convert import infer
from v2w_jax.convert.tree import Path, flatten, get_path, set_path
from v2w_jax.models.dit import abstract_params
from v2w_jax.models.dit_config import DiTConfig
from v2w_jax.models.embeddings import rope_exponents

PREFIX = "net."

# Flax module name -> torch module name, where they differ.
_RENAMES = {
    ("x_embedder", "proj"): ("x_embedder", "proj", "1"),
    ("t_embedder",): ("t_embedder", "1"),
    ("crossattn_proj",): ("crossattn_proj", "0"),
}
_SEGMENT_RENAMES = {"lora_down": "1", "lora_up": "2"}
_LEAF = {"kernel": ("weight", "linear"), "scale": ("weight", "vector"), "bias": ("bias", "vector")}
_COUNTERS = {  # name -> dtype kind ("int" or "float") of the reference training counters
    "accum_video_sample_counter": "int",
    "accum_image_sample_counter": "int",
    "accum_iteration": "int",
    "accum_train_in_hours": "float",
}
_ROPE_BUFFERS = ("pos_embedder.seq", "pos_embedder.dim_spatial_range", "pos_embedder.dim_temporal_range")


class Entry(NamedTuple):
  """One torch tensor: where it lives in the Flax tree and how it is laid out."""

  path: Path  # Flax param path
  index: int | None  # block index into the stacked (scanned) leaf, else None
  kind: str  # "linear" (transpose) | "vector"
  torch_shape: tuple[int, ...]


def _torch_module(path: Path) -> tuple[str, ...]:
  """Torch module path of a Flax module path (without the block prefix)."""
  mod = tuple(path)
  for src, dst in _RENAMES.items():
    if mod[: len(src)] == src:
      mod = dst + mod[len(src):]
  return tuple(_SEGMENT_RENAMES.get(s, s) for s in mod)


def key_table(cfg: DiTConfig, abstract: Mapping[str, Any] | None = None) -> dict[str, Entry]:
  """Torch key (without prefix) -> :class:`Entry` for every parameter tensor, in a stable order."""
  abstract = abstract_params(cfg) if abstract is None else abstract
  table: dict[str, Entry] = {}
  for path, leaf in flatten(abstract).items():
    *mod, leaf_name = path
    torch_leaf, kind = _LEAF[leaf_name]
    shape = tuple(leaf.shape)
    if mod[0] == "blocks":  # stacked under nn.scan
      inner = shape[1:]
      tshape = inner[::-1] if kind == "linear" else inner
      for i in range(shape[0]):
        key = ".".join(("blocks", str(i)) + _torch_module(tuple(mod[1:])) + (torch_leaf,))
        table[key] = Entry(path, i, kind, tshape)
    elif mod[0].startswith("blocks_"):
      i = mod[0].split("_", 1)[1]
      key = ".".join(("blocks", i) + _torch_module(tuple(mod[1:])) + (torch_leaf,))
      table[key] = Entry(path, None, kind, shape[::-1] if kind == "linear" else shape)
    else:
      key = ".".join(_torch_module(tuple(mod)) + (torch_leaf,))
      table[key] = Entry(path, None, kind, shape[::-1] if kind == "linear" else shape)
  return table


def _sort_key(key: str) -> tuple:
  return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split("."))


def extra_state_keys(table: Mapping[str, Entry]) -> list[str]:
  """``<norm>._extra_state`` keys of the reference (one per RMSNorm)."""
  return [k[: -len(".weight")] + "._extra_state" for k, e in table.items() if e.path[-1] == "scale"]


def rope_buffers(cfg: DiTConfig) -> dict[str, np.ndarray]:
  """Exact float32 RoPE buffers of the reference ``VideoRopePosition3DEmb``."""
  dim_t, dim_h, _ = cfg.rope_dims
  return {
      "pos_embedder.seq": np.arange(max(cfg.rope_max_patches), dtype=np.float32),
      "pos_embedder.dim_spatial_range": rope_exponents(dim_h, bf16=False),
      "pos_embedder.dim_temporal_range": rope_exponents(dim_t, bf16=False),
  }


def _shape_of(value: Any) -> tuple[int, ...]:
  return tuple(int(s) for s in value.shape)


def _size_mismatch(state_dict: Mapping[str, Any], cfg: DiTConfig, prefix: str) -> str | None:
  """One line naming the file's and the config's sizes when their widths differ (e.g. a 14B file given
  the 2B config); None when they agree or the file's width cannot be read."""
  try:
    found = infer.dit_sizes(state_dict, prefix)
  except infer.ConfigInferenceError:
    return None
  if (found["model_channels"], found["num_heads"]) == (cfg.model_channels, cfg.num_heads):
    return None
  fields = ("model_channels", "num_heads", "num_blocks")
  found_text = ", ".join(f"{f}={found[f]}" for f in fields)
  wanted_text = ", ".join(f"{f}={getattr(cfg, f)}" for f in fields)
  return (f"  the checkpoint holds a net with {found_text}; the config describes {wanted_text} "
          "(configs/nemo_14b.py is the 14B, configs/nemo.py the 2B)")


def _check_rope_buffer(name: str, value: Any, expected: np.ndarray) -> str | None:
  if _shape_of(value) != expected.shape:
    return f"{name}: shape {list(_shape_of(value))}, expected {list(expected.shape)}"
  got = np.asarray(value).astype(np.float32)
  rounded = expected.astype(ml_dtypes.bfloat16).astype(np.float32)
  if not (np.array_equal(got, expected) or np.array_equal(got, rounded)):
    return f"{name}: values {got.tolist()[:8]}... are neither the exact nor the bf16-rounded {expected.tolist()[:8]}..."
  return None


def torch_to_params(
    state_dict: Mapping[str, Any],
    cfg: DiTConfig,
    *,
    prefix: str = PREFIX,
    dtype: Any = None,
    on_tensor: Callable[[str], None] | None = None,
) -> dict[str, Any]:
  """Reference state dict -> nested dict of ``np.ndarray`` (the layout of ``DiT(cfg)`` params).

  Args:
    state_dict: key -> tensor (numpy arrays or lazy objects with ``.shape`` that ``np.asarray``
      materialises).
    cfg: the DiT config the checkpoint belongs to (``scan_blocks`` decides stacked or per-block).
    prefix: key prefix of the net (``"net."``).
    dtype: output dtype (default ``cfg.param_dtype``).
    on_tensor: called with each torch key after it is converted (progress reporting).

  Raises:
    ValueError: listing every missing, unknown or mis-shaped key and bad RoPE buffer.
  """
  out_dtype = np.dtype(dtype) if dtype is not None else cfg.np_param_dtype
  abstract = abstract_params(cfg)
  table = key_table(cfg, abstract)
  buffers = rope_buffers(cfg)
  unknown, bad, seen = [], [], set()
  for full_key, value in state_dict.items():
    if not full_key.startswith(prefix):
      unknown.append(full_key)
      continue
    key = full_key[len(prefix):]
    if key in table:
      seen.add(key)
      if _shape_of(value) != table[key].torch_shape:
        bad.append(f"{full_key}: shape {list(_shape_of(value))}, expected {list(table[key].torch_shape)}")
    elif key in buffers:
      seen.add(key)
      problem = _check_rope_buffer(full_key, value, buffers[key])
      if problem:
        bad.append(problem)
    elif key.endswith("_extra_state") or key.startswith("accum_"):
      continue  # TE metadata / training counters: recognised, not loaded
    else:
      unknown.append(full_key)
  missing = [prefix + k for k in list(table) + list(buffers) if k not in seen]
  if unknown or missing or bad:
    lines = [f"DiT checkpoint does not match the config ({len(missing)} missing, {len(unknown)} unknown, "
             f"{len(bad)} bad keys):"]
    lines += [m for m in [_size_mismatch(state_dict, cfg, prefix)] if m]
    lines += [f"  missing: {k}" for k in missing]
    lines += [f"  unknown: {k}" for k in unknown]
    lines += [f"  bad: {m}" for m in bad]
    raise ValueError("\n".join(lines))

  params: dict[str, Any] = {}
  for path, leaf in flatten(abstract).items():
    set_path(params, path, np.empty(leaf.shape, out_dtype))
  for key, entry in table.items():
    arr = np.asarray(state_dict[prefix + key])
    if entry.kind == "linear":
      arr = arr.T
    target = get_path(params, entry.path)
    if entry.index is None:
      target[...] = arr.astype(out_dtype, copy=False)
    else:
      target[entry.index] = arr.astype(out_dtype, copy=False)
    del arr
    if on_tensor is not None:
      on_tensor(prefix + key)
  return params


class _Lazy:
  """A torch tensor computed from a param leaf on ``np.asarray`` (``torch_pt.save`` writes one at a time)."""

  def __init__(self, fn: Callable[[], np.ndarray], shape: tuple[int, ...], dtype: np.dtype):
    self._fn, self.shape, self.dtype = fn, shape, np.dtype(dtype)

  def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
    arr = self._fn()
    return arr if dtype is None else arr.astype(dtype)


def params_to_torch(
    params: Mapping[str, Any],
    cfg: DiTConfig,
    dtype: Any = None,
    *,
    prefix: str = PREFIX,
    lazy: bool = False,
) -> dict[str, Any]:
  """Flax params -> reference state dict (``net.`` keys, ``[out, in]`` Linear weights, unstacked blocks).

  Also emits what the reference net's ``state_dict`` holds besides parameters, so that
  ``load_state_dict(strict=True)`` accepts it: the RoPE buffers (exact values, rounded like every
  other float when ``dtype`` is bf16 — the reference conversion rule), empty ``_extra_state`` tensors
  and zero ``accum_*`` counters.

  Args:
    params: a plain param tree (numpy / jax arrays), or ``jax.ShapeDtypeStruct`` leaves, in which case
      ShapeDtypeStructs of the torch tensors are returned (abstract key/shape check, no memory).
    cfg: the DiT config.
    dtype: float dtype of the output (default: each param's own dtype; buffers float32).
    lazy: return lazy values (materialised by ``np.asarray``) so a writer holds one tensor at a time.

  Raises:
    ValueError: listing every missing, unknown or mis-shaped param.
  """
  table = key_table(cfg)
  expected = {e.path: None for e in table.values()}
  abstract = flatten(abstract_params(cfg))
  given = flatten(params)
  problems = [f"missing param {'/'.join(p)}" for p in expected if p not in given]
  problems += [f"unknown param {'/'.join(p)}" for p in given if p not in expected]
  problems += [f"param {'/'.join(p)}: shape {list(_shape_of(given[p]))}, expected {list(abstract[p].shape)}"
               for p in expected if p in given and _shape_of(given[p]) != tuple(abstract[p].shape)]
  if problems:
    raise ValueError("DiT params do not match the config:\n  " + "\n  ".join(problems))

  is_abstract = any(isinstance(v, jax.ShapeDtypeStruct) for v in given.values())
  float_dtype = np.dtype(dtype) if dtype is not None else None

  def out(shape: tuple[int, ...], dt: np.dtype, fn: Callable[[], np.ndarray]) -> Any:
    if is_abstract:
      return jax.ShapeDtypeStruct(shape, dt)
    return _Lazy(fn, shape, dt) if lazy else fn()

  result: dict[str, Any] = {}
  for key in sorted(list(table) + list(rope_buffers(cfg)) + extra_state_keys(table) + list(_COUNTERS),
                    key=_sort_key):
    if key in table:
      e = table[key]
      leaf = given[e.path]
      dt = float_dtype or np.dtype(leaf.dtype)

      def fn(leaf=leaf, e=e, dt=dt) -> np.ndarray:
        arr = np.asarray(leaf if e.index is None else leaf[e.index])
        return np.ascontiguousarray(arr.T if e.kind == "linear" else arr).astype(dt, copy=False)

      result[prefix + key] = out(e.torch_shape, dt, fn)
    elif key in _COUNTERS:
      dt = np.dtype(np.int64) if _COUNTERS[key] == "int" else (float_dtype or np.dtype(np.float32))
      result[prefix + key] = out((), dt, lambda dt=dt: np.zeros((), dt))
    elif key.endswith("._extra_state"):
      dt = float_dtype or np.dtype(np.float32)
      result[prefix + key] = out((0,), dt, lambda dt=dt: np.zeros((0,), dt))
    else:
      value = rope_buffers(cfg)[key]
      dt = float_dtype or np.dtype(np.float32)
      result[prefix + key] = out(value.shape, dt, lambda v=value, dt=dt: v.astype(dt))
  return result

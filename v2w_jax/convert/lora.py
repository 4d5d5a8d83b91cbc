"""LoRA adapters in the reference's state-dict layout (peft's), and merged exports.

The reference injects peft adapters into the net (``inject_adapter_in_model``), so a LoRA net's state
dict holds, for each adapted linear layer ``M`` (torch keys, ``net.`` prefix):

  ``M.base_layer.weight``          [out, in]  the frozen base weight (``M.weight`` in a plain net)
  ``M.lora_A.default.weight``      [r, in]    <-> Flax ``M/lora_a`` [in, r]   (transposed)
  ``M.lora_B.default.weight``      [r, out]^T <-> Flax ``M/lora_b`` [r, out]  (transposed: torch [out, r])

with output = base(x) + (alpha/r)·B(A(x)). peft's own adapter files drop the adapter name
(``M.lora_A.weight``); both spellings are read. Neither file records alpha: an adapters file written
here carries a JSON sidecar ``<file>.json`` with rank, alpha and targets; without one, the caller's
alpha applies (the config's ``lora.alpha``; the reference uses alpha = r = 32).

The key table is derived from the model's own parameter tree (through ``convert/dit.py``), so it
cannot drift from the module layout; conversions are strict and name every bad key.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from v2w_jax.convert import dit as convert_dit
from v2w_jax.convert.tree import Path, flatten, get_path, set_path
from v2w_jax.models import lora as lora_lib
from v2w_jax.models.dit import abstract_params
from v2w_jax.models.dit_config import DiTConfig

PREFIX = convert_dit.PREFIX
_ADAPTER_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<name>[^.]+))?\.weight$")
_BASE_LAYER = ".base_layer."
ADAPTER_NAME = "default"
SIDECAR_SUFFIX = ".json"


class AdapterEntry(NamedTuple):
  """One adapter tensor: its Flax leaf, block index (stacked blocks) and torch shape."""

  path: Path
  index: int | None
  torch_shape: tuple[int, ...]


def _base_cfg(cfg: DiTConfig) -> DiTConfig:
  return cfg.replace(lora=None)


def adapter_key_table(cfg: DiTConfig) -> dict[str, AdapterEntry]:
  """Torch key (no prefix, peft spelling with ``.default``) -> entry, for every adapter of ``DiT(cfg)``."""
  if cfg.lora is None:
    raise ValueError("adapter_key_table needs a DiTConfig with a LoRA spec")
  _, adapters = lora_lib.split_params(abstract_params(cfg))
  flat = flatten(adapters)
  table: dict[str, AdapterEntry] = {}
  for key, entry in convert_dit.key_table(_base_cfg(cfg)).items():
    module = entry.path[:-1]
    a_path, b_path = module + (lora_lib.A_NAME,), module + (lora_lib.B_NAME,)
    if entry.path[-1] != "kernel" or a_path not in flat:
      continue
    out_features, in_features = entry.torch_shape
    rank = int(flat[a_path].shape[-1])
    stem = key[: -len(".weight")]
    table[f"{stem}.lora_A.{ADAPTER_NAME}.weight"] = AdapterEntry(a_path, entry.index, (rank, in_features))
    table[f"{stem}.lora_B.{ADAPTER_NAME}.weight"] = AdapterEntry(b_path, entry.index, (out_features, rank))
  return table


def peft_key_table(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
  """The whole state dict of the reference LoRA net (no prefix): every key and torch shape.

  Adapted layers' weights move to ``.base_layer.weight``; other keys are the plain net's.
  """
  table = {}
  adapted = {k.split(".lora_A.")[0] for k in adapter_key_table(cfg) if ".lora_A." in k}
  for key, entry in convert_dit.key_table(_base_cfg(cfg)).items():
    stem = key[: -len(".weight")] if key.endswith(".weight") else None
    table[f"{stem}.base_layer.weight" if stem in adapted else key] = entry.torch_shape
  table.update({k: e.torch_shape for k, e in adapter_key_table(cfg).items()})
  return table


# ---- reading -----------------------------------------------------------------------------------------


def canonical_adapter_key(key: str) -> str | None:
  """``M.lora_A[.name].weight`` -> ``M.lora_A.default.weight``; None for other keys."""
  m = _ADAPTER_KEY.match(key)
  if not m:
    return None
  if m.group("name") not in (None, ADAPTER_NAME):
    raise ValueError(f"{key}: adapter '{m.group('name')}' (only peft's '{ADAPTER_NAME}' adapter is read)")
  return f"{m.group('module')}.lora_{m.group('which')}.{ADAPTER_NAME}.weight"


def is_lora_state_dict(keys) -> bool:
  return any(_ADAPTER_KEY.match(k) for k in keys)


def split_state_dict(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """(plain net state dict, adapter tensors) of a reference LoRA state dict.

  ``M.base_layer.weight`` becomes ``M.weight``; adapter keys are canonicalised (``.default``).
  Values are passed through (lazy tensors stay lazy).
  """
  base, adapters = {}, {}
  for key, value in state_dict.items():
    canonical = canonical_adapter_key(key)
    if canonical is not None:
      adapters[canonical] = value
    else:
      base[key.replace(_BASE_LAYER, ".")] = value
  return base, adapters


def infer_spec(adapter_state: Mapping[str, Any], alpha: float, prefix: str = PREFIX) -> lora_lib.LoRASpec:
  """Rank and targets (as layer names without the block index) of a set of adapter tensors."""
  ranks, targets = set(), set()
  for key, value in adapter_state.items():
    canonical = canonical_adapter_key(key)
    if canonical is None:
      continue
    module = canonical[len(prefix):] if canonical.startswith(prefix) else canonical
    module = module.split(".lora_")[0]
    parts = module.split(".")
    if parts[0] == "blocks" and len(parts) > 2 and parts[1].isdigit():
      parts = parts[2:]
    targets.add(".".join(parts))
    shape = tuple(int(s) for s in value.shape)
    ranks.add(shape[0] if ".lora_A." in canonical else shape[-1])
  if not targets:
    raise ValueError("no LoRA adapter tensors (keys '*.lora_A[.default].weight' / '*.lora_B[...]')")
  if len(ranks) != 1:
    raise ValueError(f"LoRA adapters of different ranks {sorted(ranks)}: one rank per file is supported")
  return lora_lib.LoRASpec(ranks.pop(), alpha, tuple(sorted(targets)))


def torch_to_adapters(adapter_state: Mapping[str, Any], cfg: DiTConfig, *, prefix: str = PREFIX,
                      dtype: Any = np.float32) -> dict[str, Any]:
  """Adapter tensors (torch layout, any spelling) -> the Flax adapters tree of ``DiT(cfg)`` (numpy).

  Raises:
    ValueError: listing every missing, unknown and mis-shaped adapter tensor.
  """
  table = adapter_key_table(cfg)
  given = {}
  unknown, bad = [], []
  for key, value in adapter_state.items():
    canonical = canonical_adapter_key(key)
    short = canonical[len(prefix):] if canonical and canonical.startswith(prefix) else None
    if short not in table:
      unknown.append(key)
      continue
    given[short] = value
    shape = tuple(int(s) for s in value.shape)
    if shape != table[short].torch_shape:
      bad.append(f"{key}: shape {list(shape)}, expected {list(table[short].torch_shape)}")
  missing = [prefix + k for k in table if k not in given]
  if missing or unknown or bad:
    lines = [f"LoRA adapters do not match the model and LoRA settings ({len(missing)} missing, "
             f"{len(unknown)} unknown, {len(bad)} bad keys):"]
    lines += [f"  missing: {k}" for k in missing[:40]] + [f"  unknown: {k}" for k in unknown[:40]]
    lines += [f"  bad: {m}" for m in bad[:40]]
    raise ValueError("\n".join(lines))
  _, abstract = lora_lib.split_params(abstract_params(cfg))
  out: dict[str, Any] = {}
  for path, leaf in flatten(abstract).items():
    set_path(out, path, np.empty(leaf.shape, np.dtype(dtype)))
  for key, entry in table.items():
    arr = np.asarray(given[key]).astype(np.dtype(dtype)).T
    target = get_path(out, entry.path)
    if entry.index is None:
      target[...] = arr
    else:
      target[entry.index] = arr
  return out


# ---- writing -----------------------------------------------------------------------------------------


def adapters_to_torch(adapters: Mapping[str, Any], cfg: DiTConfig, *, prefix: str = PREFIX,
                      dtype: Any = np.float32) -> dict[str, np.ndarray]:
  """The Flax adapters tree -> peft-layout tensors (``net.…lora_A.default.weight`` [r, in], …)."""
  table = adapter_key_table(cfg)
  flat = flatten(adapters)
  expected = {e.path for e in table.values()}
  problems = [f"missing adapter {'/'.join(p)}" for p in sorted(expected) if p not in flat]
  problems += [f"unknown adapter {'/'.join(p)}" for p in sorted(flat) if p not in expected]
  if problems:
    raise ValueError("adapters do not match the LoRA settings:\n  " + "\n  ".join(problems))
  out = {}
  for key, entry in table.items():
    leaf = np.asarray(flat[entry.path])
    arr = leaf if entry.index is None else leaf[entry.index]
    out[prefix + key] = np.ascontiguousarray(arr.T).astype(np.dtype(dtype))
  return out


def merge_torch_weight(weight: Any, lora_a: Any, lora_b: Any, factor: float) -> np.ndarray:
  """``W + factor·(B @ A)`` in float32 (torch layouts: W [out, in], A [r, in], B [out, r])."""
  w = np.asarray(weight).astype(np.float32)
  return w + np.float32(factor) * (np.asarray(lora_b, np.float32) @ np.asarray(lora_a, np.float32))


def merged_to_torch(base: Mapping[str, Any], adapters: Mapping[str, Any], cfg: DiTConfig, *,
                    dtype: Any, factor: float | None = None, prefix: str = PREFIX) -> dict[str, Any]:
  """The reference state dict of the merged model, base + (alpha/r)·B·A, as lazy tensors.

  Every key of a plain net (``convert_dit.params_to_torch``); adapted weights are
  :func:`merge_torch_weight` of the base tensor and the adapters, rounded once to ``dtype``.
  ``factor`` defaults to ``cfg.lora.scale`` (alpha / r).
  """
  factor = cfg.lora.scale if factor is None else float(factor)
  out_dtype = np.dtype(dtype)
  mapping = convert_dit.params_to_torch(base, _base_cfg(cfg), dtype=np.float32, prefix=prefix, lazy=True)
  lora_tensors = adapters_to_torch(adapters, cfg, prefix=prefix)
  for key in list(mapping):
    a_key = key[: -len(".weight")] + f".lora_A.{ADAPTER_NAME}.weight"
    value = mapping[key]
    if a_key in lora_tensors:
      b_key = a_key.replace(".lora_A.", ".lora_B.")
      fn = (lambda w=value, a=lora_tensors[a_key], b=lora_tensors[b_key]:
            merge_torch_weight(np.asarray(w), a, b, factor).astype(out_dtype))
    else:
      fn = (lambda w=value: _round_float(np.asarray(w), out_dtype))
    mapping[key] = convert_dit._Lazy(fn, tuple(value.shape), out_dtype if _is_float(value.dtype) else value.dtype)
  return mapping


def _is_float(dtype: Any) -> bool:
  d = np.dtype(dtype)
  return d.kind == "f" or d.name == "bfloat16"


def _round_float(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
  return arr.astype(dtype) if _is_float(arr.dtype) else arr


def write_sidecar(path: str | pathlib.Path, spec: lora_lib.LoRASpec, **extra: Any) -> pathlib.Path:
  """``<path>.json``: rank, alpha and targets of an adapters file (peft's adapter_config fields)."""
  side = pathlib.Path(str(path) + SIDECAR_SUFFIX)
  side.write_text(json.dumps({"r": spec.rank, "lora_alpha": spec.alpha, "target_modules": list(spec.targets or ()),
                              **extra}, indent=1))
  return side


def read_sidecar(path: str | pathlib.Path) -> dict | None:
  side = pathlib.Path(str(path) + SIDECAR_SUFFIX)
  if not side.is_file():
    return None
  try:
    return json.loads(side.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{side}: not valid JSON ({e})") from e

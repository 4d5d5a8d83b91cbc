"""Wan2.1 VAE weights: PyTorch state dict (``Wan2.1_VAE.pth`` layout) <-> Flax params.

The torch keys are positional (``downsamples.5``, ``residual.6``, ``head.2``...), so the mapping is a
table built from the same block layout the Flax modules use (``models.vae.encoder_blocks`` /
``decoder_blocks``). Layout changes (channels-last Flax):

  Conv3d weight ``[O, I, kT, kH, kW]`` -> kernel ``[kT, kH, kW, I, O]``
  Conv2d weight ``[O, I, 3, 3]``       -> kernel ``[3, 3, I, O]``
  attention 1x1 ``[O, I, 1, 1]``       -> Dense kernel ``[I, O]``
  RMS gamma ``[C, 1, 1(, 1)]``         -> scale ``[C]``;  biases unchanged.

Both directions are strict: missing, unknown or mis-shaped keys raise one ``ValueError`` that lists
them all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from v2w_jax.convert.tree import Path, flatten, set_path
from v2w_jax.models.vae import VAEConfig, abstract_params, decoder_blocks, encoder_blocks

# kind -> (torch -> flax, flax -> torch); both only use .transpose/.reshape so they also run on
# jax.ShapeDtypeStruct leaves through jax.eval_shape.
_TO_FLAX: dict[str, Callable[[Any], Any]] = {
    "conv3d": lambda w: w.transpose(2, 3, 4, 1, 0),
    "conv2d": lambda w: w.transpose(2, 3, 1, 0),
    "dense": lambda w: w.reshape(w.shape[0], w.shape[1]).transpose(1, 0),
    "gamma3d": lambda g: g.reshape(g.shape[0]),
    "gamma2d": lambda g: g.reshape(g.shape[0]),
    "bias": lambda b: b,
}
_TO_TORCH: dict[str, Callable[[Any], Any]] = {
    "conv3d": lambda k: k.transpose(4, 3, 0, 1, 2),
    "conv2d": lambda k: k.transpose(3, 2, 0, 1),
    "dense": lambda k: k.transpose(1, 0).reshape(k.shape[1], k.shape[0], 1, 1),
    "gamma3d": lambda s: s.reshape(s.shape[0], 1, 1, 1),
    "gamma2d": lambda s: s.reshape(s.shape[0], 1, 1),
    "bias": lambda b: b,
}


def _conv(table: dict, tkey: str, path: Path, kind: str = "conv3d") -> None:
  table[f"{tkey}.weight"] = (path + ("kernel",), kind)
  table[f"{tkey}.bias"] = (path + ("bias",), "bias")


def _residual(table: dict, tkey: str, path: Path, in_dim: int, out_dim: int) -> None:
  table[f"{tkey}.residual.0.gamma"] = (path + ("norm1", "scale"), "gamma3d")
  _conv(table, f"{tkey}.residual.2", path + ("conv1",))
  table[f"{tkey}.residual.3.gamma"] = (path + ("norm2", "scale"), "gamma3d")
  _conv(table, f"{tkey}.residual.6", path + ("conv2",))
  if in_dim != out_dim:
    _conv(table, f"{tkey}.shortcut", path + ("shortcut",))


def _attention(table: dict, tkey: str, path: Path) -> None:
  table[f"{tkey}.norm.gamma"] = (path + ("norm", "scale"), "gamma2d")
  _conv(table, f"{tkey}.to_qkv", path + ("to_qkv",), "dense")
  _conv(table, f"{tkey}.proj", path + ("proj",), "dense")


def _trunk(table: dict, tprefix: str, fprefix: str, blocks, list_name: str, c_mid: int,
           encoder: bool) -> None:
  def middle():
    _residual(table, f"{tprefix}.middle.0", (fprefix, "middle_0"), c_mid, c_mid)
    _attention(table, f"{tprefix}.middle.1", (fprefix, "middle_1"))
    _residual(table, f"{tprefix}.middle.2", (fprefix, "middle_2"), c_mid, c_mid)

  _conv(table, f"{tprefix}.conv1", (fprefix, "conv1"))
  if not encoder:
    middle()
  for blk in blocks:
    tkey, path = f"{tprefix}.{list_name}.{blk.index}", (fprefix, f"{list_name}_{blk.index}")
    if blk.kind == "residual":
      _residual(table, tkey, path, blk.in_dim, blk.out_dim)
    else:
      _conv(table, f"{tkey}.resample.1", path + ("conv",), "conv2d")
      if blk.kind.endswith("3d"):
        _conv(table, f"{tkey}.time_conv", path + ("time_conv",))
  if encoder:
    middle()
  table[f"{tprefix}.head.0.gamma"] = ((fprefix, "head_norm", "scale"), "gamma3d")
  _conv(table, f"{tprefix}.head.2", (fprefix, "head_conv"))


def key_table(cfg: VAEConfig) -> dict[str, tuple[Path, str]]:
  """torch key -> (Flax param path, layout kind), in the reference state-dict order."""
  table: dict[str, tuple[Path, str]] = {}
  enc, dec = encoder_blocks(cfg), decoder_blocks(cfg)
  _trunk(table, "encoder", "encoder", enc, "downsamples", enc[-1].out_dim, encoder=True)
  _conv(table, "conv1", ("conv1",))
  _conv(table, "conv2", ("conv2",))
  dims = cfg.base_dim * cfg.dim_mult[-1]
  _trunk(table, "decoder", "decoder", dec, "upsamples", dims, encoder=False)
  return table


def _shape(v: Any) -> tuple[int, ...]:
  shape = getattr(v, "shape", None)
  return tuple(int(s) for s in (shape if shape is not None else np.shape(np.asarray(v))))


def _apply(kind: str, fns: dict, v: Any) -> Any:
  if isinstance(v, jax.ShapeDtypeStruct):
    return jax.eval_shape(fns[kind], v)
  return np.ascontiguousarray(fns[kind](np.asarray(v)))


def expected_torch_shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
  """Every torch key with its shape, derived from the Flax model's abstract parameters."""
  return {k: tuple(v.shape) for k, v in params_to_torch(abstract_params(cfg), cfg).items()}


def _raise(what: str, problems: dict[str, list[str]]) -> None:
  lines = []
  for name, items in problems.items():
    if items:
      lines.append(f"  {name} ({len(items)}):\n" + "\n".join(f"    {i}" for i in items))
  if lines:
    raise ValueError(f"{what}:\n" + "\n".join(lines))


def torch_to_params(state_dict: Mapping[str, Any], cfg: VAEConfig,
                    dtype: np.dtype | str | None = np.float32) -> dict[str, Any]:
  """Reference ``WanVAE_`` state dict -> nested Flax params of ``np.ndarray``.

  Args:
    state_dict: torch key -> array-like (torch tensor, numpy array or a lazy tensor; materialised
      one at a time with ``np.asarray``).
    cfg: the architecture (``base_dim`` etc. must match the checkpoint).
    dtype: dtype of the returned arrays (float32 by default; None keeps the stored dtype).

  Raises:
    ValueError: listing every missing, unknown and mis-shaped key.
  """
  table = key_table(cfg)
  expected = expected_torch_shapes(cfg)
  keys = set(state_dict.keys())
  missing = [k for k in table if k not in keys]
  unknown = sorted(k for k in keys if k not in table)
  misshaped = [f"{k}: got {_shape(state_dict[k])}, expected {expected[k]}" for k in table
               if k in keys and _shape(state_dict[k]) != expected[k]]
  _raise(f"Wan VAE state dict does not match the model (base_dim={cfg.base_dim}, "
         f"z_dim={cfg.z_dim})", {"missing": missing, "unknown": unknown, "mis-shaped": misshaped})
  params: dict[str, Any] = {}
  for tkey, (path, kind) in table.items():
    arr = np.asarray(state_dict[tkey])
    if dtype is not None:
      arr = arr.astype(dtype)
    set_path(params, path, _apply(kind, _TO_FLAX, arr))
  return params


def params_to_torch(params: Mapping[str, Any], cfg: VAEConfig) -> dict[str, Any]:
  """Flax params -> reference state dict (``np.ndarray`` values, torch layouts, torch key order).

  Leaves that are ``jax.ShapeDtypeStruct`` map to ``ShapeDtypeStruct`` of the torch shape.

  Raises:
    ValueError: listing every missing and unknown parameter path (shapes are checked by the
      reverse direction).
  """
  table = key_table(cfg)
  flat = flatten(params)
  wanted = {path for path, _ in table.values()}
  missing = ["/".join(p) for p in wanted if p not in flat]
  unknown = sorted("/".join(p) for p in flat if p not in wanted)
  _raise("Wan VAE params do not match the model", {"missing": sorted(missing), "unknown": unknown})
  out: dict[str, Any] = {}
  for tkey, (path, kind) in table.items():
    v = flat[path]
    if not isinstance(v, jax.ShapeDtypeStruct):
      v = np.asarray(v)
    out[tkey] = _apply(kind, _TO_TORCH, v)
  return out

"""Static configuration of the Video2World DiT (the reference ``MinimalV1LVGDiT``).

Field names follow the reference constructor kwargs (``configs/nemo.py: model_2b()``), plus port
options (dtypes, attention backend, remat, scan, logical axis rules). The dataclass is frozen and
hashable so it can be a Flax module attribute and a static jit argument.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from v2w_jax.models.attention import BACKENDS as _BACKENDS
from v2w_jax.models.lora import LoRASpec
from v2w_jax.models.remat import POLICIES as _REMAT
from v2w_jax.parallel import rules as rules_lib

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Reference kwargs that have no effect on this port's forward (no parameters, no numerics).
_IGNORED_REFERENCE_KWARGS = frozenset({
    "atten_backend",  # the attention op is chosen by `attention_backend`
    "sac_config",  # activation checkpointing: `remat_policy`
    "pos_emb_learnable",  # unused by rope3d
    "pos_emb_interpolation",  # unused by rope3d
    "min_fps",
    "max_fps",
    "extra_h_extrapolation_ratio",  # only with extra_per_block_abs_pos_emb
    "extra_w_extrapolation_ratio",
    "extra_t_extrapolation_ratio",
    "use_wan_fp32_strategy",  # the fp32 islands are always on (dit_spec §8)
})
# Reference kwargs that must have exactly these values (features this port does not implement).
_REQUIRED_REFERENCE_VALUES = {
    "pos_emb_cls": "rope3d",
    "use_adaln_lora": True,
    "extra_per_block_abs_pos_emb": False,
    "rope_enable_fps_modulation": False,
    "extra_image_context_dim": None,
    "n_dense_blocks": -1,
    "natten_parameters": None,
}


def _canonical_dtype(name: Any, field: str) -> str:
  key = jnp.dtype(name).name if not isinstance(name, str) else name
  if key not in _DTYPES:
    raise ValueError(f"DiTConfig.{field}={name!r}: expected one of {sorted(_DTYPES)}")
  return key


def _freeze_rules(rules: Any) -> tuple[tuple[str, Any], ...]:
  """Rules as nested tuples (hashable); mesh axes may be None, a name or a tuple of names."""
  out = []
  for pair in rules:
    logical, mesh = tuple(pair)
    if isinstance(mesh, (list, tuple)):
      mesh = tuple(mesh)
    out.append((str(logical), mesh))
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """Hyper-parameters of the DiT. Defaults are the 2B model (dit_spec §2)."""

  model_channels: int = 2048
  num_heads: int = 16
  num_blocks: int = 28
  mlp_ratio: float = 4.0
  in_channels: int = 16  # latent channels; +1 condition mask (+1 padding mask) are added inside
  out_channels: int = 16
  patch_spatial: int = 2
  patch_temporal: int = 1
  concat_padding_mask: bool = True
  adaln_lora_dim: int = 256
  crossattn_emb_channels: int = 1024
  use_crossattn_projection: bool = True
  crossattn_proj_in_channels: int = 100352
  max_img_h: int = 240
  max_img_w: int = 240
  max_frames: int = 128
  rope_h_extrapolation_ratio: float = 3.0
  rope_w_extrapolation_ratio: float = 3.0
  rope_t_extrapolation_ratio: float = 1.0
  timestep_scale: float = 0.001
  # Port options.
  rope_bf16_exponents: bool = True
  param_dtype: str = "float32"
  dtype: str = "bfloat16"
  attention_backend: str = "auto"
  remat_policy: str = "save_attention"
  scan_blocks: bool = True
  logical_axis_rules: tuple[tuple[str, Any], ...] = rules_lib.DEFAULT_RULES
  lora: LoRASpec | None = None  # LoRA adapters on the targeted block layers (models/lora.py); None = off

  def __post_init__(self):
    object.__setattr__(self, "param_dtype", _canonical_dtype(self.param_dtype, "param_dtype"))
    object.__setattr__(self, "dtype", _canonical_dtype(self.dtype, "dtype"))
    object.__setattr__(self, "logical_axis_rules", _freeze_rules(self.logical_axis_rules))
    if self.attention_backend not in _BACKENDS:
      raise ValueError(f"DiTConfig.attention_backend={self.attention_backend!r}: expected one of {_BACKENDS}")
    if self.remat_policy not in _REMAT:
      raise ValueError(f"DiTConfig.remat_policy={self.remat_policy!r}: expected one of {_REMAT}")
    if self.lora is not None and not isinstance(self.lora, LoRASpec):
      raise ValueError(f"DiTConfig.lora must be a LoRASpec or None, got {type(self.lora).__name__}")
    if self.model_channels % self.num_heads:
      raise ValueError(f"model_channels={self.model_channels} is not divisible by num_heads={self.num_heads}")
    if self.head_dim < 6 or self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even and >= 6 for the 3-D RoPE split")

  # ---- derived sizes -------------------------------------------------------------------------------
  @property
  def head_dim(self) -> int:
    return self.model_channels // self.num_heads

  @property
  def mlp_hidden(self) -> int:
    return int(self.model_channels * self.mlp_ratio)

  @property
  def rope_dims(self) -> tuple[int, int, int]:
    """Head-dim split (t, h, w) of the 3-D RoPE: h = w = dh//6*2, t = the rest."""
    dim_h = self.head_dim // 6 * 2
    return self.head_dim - 2 * dim_h, dim_h, dim_h

  @property
  def patch_in_features(self) -> int:
    channels = self.in_channels + 1 + int(self.concat_padding_mask)
    return channels * self.patch_temporal * self.patch_spatial**2

  @property
  def patch_out_features(self) -> int:
    return self.out_channels * self.patch_temporal * self.patch_spatial**2

  @property
  def text_in_channels(self) -> int:
    """Width of `crossattn_emb` as given to the net."""
    return self.crossattn_proj_in_channels if self.use_crossattn_projection else self.crossattn_emb_channels

  @property
  def rope_max_patches(self) -> tuple[int, int, int]:
    """Largest (T', H', W') the RoPE tables of the reference cover."""
    return (self.max_frames // self.patch_temporal, self.max_img_h // self.patch_spatial,
            self.max_img_w // self.patch_spatial)

  @property
  def jnp_dtype(self) -> Any:
    return _DTYPES[self.dtype]

  @property
  def jnp_param_dtype(self) -> Any:
    return _DTYPES[self.param_dtype]

  @property
  def np_param_dtype(self) -> np.dtype:
    return np.dtype(_DTYPES[self.param_dtype])

  # ---- constructors --------------------------------------------------------------------------------
  def replace(self, **changes: Any) -> DiTConfig:
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_config(cls, model_cfg: Mapping[str, Any] | Any, **overrides: Any) -> DiTConfig:
    """From ``config.model`` (a ConfigDict or a dict). Unknown fields raise (typos are bugs)."""
    values = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
    values.update(overrides)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ValueError(f"unknown DiT config fields {unknown}; known: {sorted(names)}")
    return cls(**values)

  @classmethod
  def from_reference_kwargs(cls, net: Mapping[str, Any], **port_options: Any) -> DiTConfig:
    """From the reference constructor kwargs (e.g. a fixture's ``config.json["net"]``).

    Kwargs without numerical effect are ignored; kwargs selecting features the port lacks must have
    the value the 2B model uses, else ValueError.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    values, problems = {}, []
    for key, value in net.items():
      if key in _IGNORED_REFERENCE_KWARGS:
        continue
      if key in _REQUIRED_REFERENCE_VALUES:
        if value != _REQUIRED_REFERENCE_VALUES[key]:
          problems.append(f"{key}={value!r} (only {_REQUIRED_REFERENCE_VALUES[key]!r} is supported)")
        continue
      if key not in names:
        problems.append(f"{key} (unknown reference kwarg)")
        continue
      values[key] = value
    if problems:
      raise ValueError("unsupported reference DiT kwargs: " + "; ".join(problems))
    values.update(port_options)
    return cls(**values)

"""Which model a checkpoint holds, read from its keys and tensor shapes.

Two uses: a checkpoint given as the wrong kind (a Wan VAE file where a DiT is expected, or the reverse)
is named as such instead of listing hundreds of unknown keys; and ``tools/convert_torch_ckpt.py``
without ``--config`` sizes the model from the file itself rather than assuming the 2B one.

The sizes a checkpoint determines -- DiT width, depth, head size, MLP width, AdaLN-LoRA rank, text
widths; VAE base width and latent channels -- are read from a few tensors. Everything the shapes do not
determine (patch sizes, latent channels of the DiT, RoPE settings, the VAE's stage layout) keeps the
released model's value; if that is wrong the strict converters report the mismatching keys, and the
message says to pass ``--config``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from v2w_jax.models.dit_config import DiTConfig
from v2w_jax.models.vae import VAEConfig
from v2w_jax.user_errors import UserError

KIND_NAMES = {"dit": "DiT", "vae": "VAE"}

# DiT size -> (torch key without the prefix, axis of its [out, in] shape).
_DIT_PROBES = {
    "model_channels": ("x_embedder.proj.1.weight", 0),
    "head_dim": ("blocks.0.self_attn.q_norm.weight", 0),
    "mlp_hidden": ("blocks.0.mlp.layer1.weight", 0),
    "adaln_lora_dim": ("blocks.0.adaln_modulation_self_attn.1.weight", 0),
    "crossattn_emb_channels": ("blocks.0.cross_attn.k_proj.weight", 1),
}
_CROSSATTN_PROJ = "crossattn_proj.0.weight"  # [crossattn_emb_channels, crossattn_proj_in_channels]


class ConfigInferenceError(UserError, ValueError):
  """The shapes do not determine a model of this port (a key the sizes are read from is missing)."""


def _strip(key: str, prefix: str) -> str:
  return key[len(prefix):] if prefix and key.startswith(prefix) else key


def detect_kind(keys: Iterable[str], prefix: str = "net.") -> str | None:
  """'dit', 'vae', or None when the keys look like neither (torch key names, with or without ``prefix``)."""
  names = [_strip(k, prefix) for k in keys]
  if any(n.startswith(("blocks.", "x_embedder.", "final_layer.")) for n in names):
    return "dit"
  if any(n.startswith(("encoder.", "decoder.")) for n in names):
    return "vae"
  return None


def _shape(value: Any) -> tuple[int, ...]:
  return tuple(int(s) for s in (value if isinstance(value, tuple) else value.shape))


def dit_sizes(shapes: Mapping[str, Any], prefix: str = "net.") -> dict[str, Any]:
  """The DiTConfig fields the tensors determine; ``shapes`` maps torch keys to shapes or tensors."""
  by_name = {_strip(k, prefix): v for k, v in shapes.items()}
  missing = [key for key, _ in _DIT_PROBES.values() if key not in by_name]
  if missing:
    raise ConfigInferenceError(f"cannot read the DiT size: no {', '.join(prefix + m for m in missing)}")
  got = {name: _shape(by_name[key])[axis] for name, (key, axis) in _DIT_PROBES.items()}
  blocks = {int(n.split(".")[1]) for n in by_name if n.startswith("blocks.") and n.split(".")[1].isdigit()}
  sizes: dict[str, Any] = dict(
      model_channels=got["model_channels"],
      num_heads=got["model_channels"] // got["head_dim"],
      num_blocks=max(blocks) + 1,
      mlp_ratio=got["mlp_hidden"] / got["model_channels"],
      adaln_lora_dim=got["adaln_lora_dim"],
      crossattn_emb_channels=got["crossattn_emb_channels"],
  )
  if _CROSSATTN_PROJ in by_name:
    sizes.update(use_crossattn_projection=True, crossattn_proj_in_channels=_shape(by_name[_CROSSATTN_PROJ])[1])
  else:
    sizes.update(use_crossattn_projection=False)
  return sizes


def dit_config_from_shapes(shapes: Mapping[str, Any], base: DiTConfig | None = None,
                           prefix: str = "net.") -> DiTConfig:
  """``base`` (default: the 2B model) resized to the checkpoint (torch keys -> shapes or tensors)."""
  base = base or DiTConfig()
  try:
    return base.replace(**dit_sizes(shapes, prefix))
  except (ValueError, ZeroDivisionError) as e:
    raise ConfigInferenceError(f"the tensor shapes give no valid DiT config ({e})") from e


def dit_config_from_params(params: Mapping[str, Any], base: DiTConfig | None = None) -> DiTConfig:
  """The same from a Flax params tree (stacked or per-block), through the converter's key table."""
  from v2w_jax.convert import dit as convert_dit  # pylint: disable=import-outside-toplevel

  base = base or DiTConfig()
  try:
    table = convert_dit.key_table(base, params)
  except (KeyError, IndexError, ValueError) as e:
    raise ConfigInferenceError(f"not a DiT params tree ({type(e).__name__}: {e})") from e
  return dit_config_from_shapes({k: e.torch_shape for k, e in table.items()}, base.replace(
      scan_blocks="blocks" in params), prefix="")


def vae_config_from_shapes(shapes: Mapping[str, Any], base: VAEConfig | None = None) -> VAEConfig:
  """``base`` (default: the released Wan2.1 VAE) with the base width and latent channels of the file."""
  base = base or VAEConfig()
  for key in ("encoder.conv1.weight", "conv2.weight"):
    if key not in shapes:
      raise ConfigInferenceError(f"cannot read the VAE size: no {key}")
  return _vae(base, _shape(shapes["encoder.conv1.weight"])[0], _shape(shapes["conv2.weight"])[0])


def vae_config_from_params(params: Mapping[str, Any], base: VAEConfig | None = None) -> VAEConfig:
  """The same from a Flax VAE params tree (channels-last kernels)."""
  try:
    base_dim = _shape(params["encoder"]["conv1"]["kernel"])[-1]
    z_dim = _shape(params["conv2"]["kernel"])[-1]
  except (KeyError, TypeError) as e:
    raise ConfigInferenceError(f"not a VAE params tree (no {e})") from e
  return _vae(base or VAEConfig(), base_dim, z_dim)


def _vae(base: VAEConfig, base_dim: int, z_dim: int) -> VAEConfig:
  if z_dim != base.z_dim:
    raise ConfigInferenceError(f"the VAE has {z_dim} latent channels; this port's Wan2.1 VAE has {base.z_dim}")
  return dataclasses.replace(base, base_dim=base_dim)


def describe(cfg: DiTConfig | VAEConfig) -> str:
  """The inferred sizes, for messages."""
  if isinstance(cfg, DiTConfig):
    return (f"model_channels={cfg.model_channels}, num_heads={cfg.num_heads}, num_blocks={cfg.num_blocks}, "
            f"mlp_ratio={cfg.mlp_ratio:g}, adaln_lora_dim={cfg.adaln_lora_dim}, "
            f"crossattn_emb_channels={cfg.crossattn_emb_channels}, "
            f"crossattn_proj_in_channels={cfg.crossattn_proj_in_channels}")
  return f"base_dim={cfg.base_dim}, z_dim={cfg.z_dim}"

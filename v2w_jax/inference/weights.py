"""DiT and VAE weights for inference and tools: numpy trees in the model's parameter dtype.

``load_dit_params(path, cfg)`` and ``load_vae_params(path, cfg)`` accept every form
``convert/load.py`` reads (a reference ``.pt``/``.pth``, a params folder, and for the DiT a training
checkpoint's EMA weights). ``random_*_params`` make stand-in weights for tests, smoke runs and
benchmarks.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from v2w_jax.convert import dit as convert_dit
from v2w_jax.convert import vae as convert_vae
from v2w_jax.convert.load import load_weights
from v2w_jax.models import dit as dit_lib
from v2w_jax.models import vae as vae_lib
from v2w_jax.models.dit_config import DiTConfig


def load_dit_params(path: str | os.PathLike, cfg: DiTConfig, *, use_ema: bool = True) -> Any:
  """DiT params (nested dict of numpy arrays in ``cfg.param_dtype``) from any supported checkpoint."""
  return load_weights(path, dit_lib.abstract_params(cfg), lambda sd: convert_dit.torch_to_params(sd, cfg),
                      what="DiT", use_ema=use_ema)


def load_vae_params(path: str | os.PathLike, cfg: vae_lib.VAEConfig) -> Any:
  """VAE params (fp32 numpy arrays) from a ``Wan2.1_VAE.pth`` or a params-only orbax folder."""
  abstract = jax.tree.map(lambda l: jax.ShapeDtypeStruct(l.shape, np.float32), vae_lib.abstract_params(cfg))
  return load_weights(path, abstract, lambda sd: convert_vae.torch_to_params(sd, cfg), what="VAE",
                      training_checkpoints=False)


def config_vae_params(config: Any, sharding: jax.sharding.Sharding) -> Any:
  """The VAE weights ``config.vae`` names, as jax.Arrays placed with ``sharding`` (replicated).

  ``config.vae.checkpoint_path`` in any form :func:`load_vae_params` reads, or, when it is empty, a
  random init from ``config.seed + 1`` (toy runs). The trainer and ``tools/cache_latents.py`` both take
  their weights from here, so a cache built for a config holds that config's latents.
  """
  cfg = vae_lib.VAEConfig.from_config(config.vae)
  if config.vae.checkpoint_path:
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                            vae_lib.abstract_params(cfg))
    return load_weights(config.vae.checkpoint_path, abstract, lambda sd: convert_vae.torch_to_params(sd, cfg),
                        what="VAE", training_checkpoints=False)
  return jax.jit(lambda k: vae_lib.init_params(cfg, k), out_shardings=sharding)(jax.random.key(config.seed + 1))


def random_params_like(abstract: Any, seed: int = 0, *, stacked: tuple[str, ...] = ("blocks",)) -> Any:
  """Random numpy params shaped like ``abstract`` without compiling the model's init (fast on CPU).

  ``kernel`` leaves ~ N(0, 1/fan_in) (fan_in = product of all but the last axis, not counting the leading
  layer axis of subtrees named in ``stacked``), ``bias`` zeros, ``scale`` ones, anything else N(0, 0.02^2).
  For tests, smoke runs and benchmarks only: the outputs are noise.
  """
  rng = np.random.default_rng(seed)

  def fill(kp, leaf):
    names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in kp]
    shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
    if names[-1] == "bias":
      return np.zeros(shape, dtype)
    if names[-1] == "scale":
      return np.ones(shape, dtype)
    if names[-1] == "kernel" and len(shape) >= 2:
      dims = shape[1:-1] if names[0] in stacked else shape[:-1]
      std = 1.0 / np.sqrt(max(1, int(np.prod(dims))))
    else:
      std = 0.02
    arr = rng.standard_normal(shape, dtype=np.float32)
    arr *= np.float32(std)
    return arr.astype(dtype, copy=False)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def random_dit_params(cfg: DiTConfig, seed: int = 0) -> Any:
  """Random DiT params in ``cfg.param_dtype`` (tests, smoke runs and benchmarks only)."""
  return random_params_like(dit_lib.abstract_params(cfg), seed, stacked=("blocks",) if cfg.scan_blocks else ())


def random_vae_params(cfg: vae_lib.VAEConfig, seed: int = 0) -> Any:
  """Random fp32 VAE params (tests, smoke runs and benchmarks only)."""
  return random_params_like(vae_lib.abstract_params(cfg), seed, stacked=())

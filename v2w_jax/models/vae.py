"""Wan2.1 video VAE (the Cosmos-Predict2.5 tokenizer) in Flax Linen.

Public API (all arrays at the boundary are PyTorch-ordered ``[B, C, T, H, W]``):

  cfg = VAEConfig.from_config(config.vae)         # or VAEConfig.from_fixture(config_json)
  vae = WanVAE(cfg)
  params = vae.init_params(jax.random.key(0))     # or convert.vae.torch_to_params(state_dict, cfg)
  latents = vae.encode(params, video)             # video in [-1, 1], [B,3,1+4k,8h,8w] -> fp32 [B,16,1+k,h,w]
  video = vae.decode(params, latents)             # -> fp32 [B,3,1+4k,8h,8w], not clamped

``encode_video`` / ``decode_latents`` are the same pure functions without ``jax.jit`` (for use inside
a larger jitted step). Internally the model runs channels-last ``[B, T, H, W, C]`` in ``cfg.dtype``
(bf16 by default, like Cosmos), one temporal chunk at a time: frame 0 alone, then ``lax.scan`` over
equal chunks (``encode_chunk`` pixel frames / ``decode_chunk`` latent frames) with the causal
history of every temporal conv as scan carry, so compile time and memory do not grow with ``T``.
This equals the reference's chunked, cached inference exactly (vae_spec.md §5). A ragged tail is
zero-padded to a whole chunk and trimmed, which is exact because everything is causal.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from v2w_jax.models.vae_layers import (CACHE, AttentionBlock, CausalConv3d, Resample, ResidualBlock,
                                       RMSNorm)

Array = jax.Array
Params = Mapping[str, Any]

# Latent statistics of the released Wan2.1 VAE (vae_spec.md §6), channel order 0..15.
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715,
               0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652,
              1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Architecture, precision and chunking of the Wan2.1 VAE.

  Attributes:
    base_dim: width of the first stage (96 released; the fixtures use 8).
    z_dim: latent channels.
    dim_mult: per-stage width multipliers.
    num_res_blocks: residual blocks per encoder stage (the decoder uses one more).
    temporal_downsample: per encoder stage transition, whether it also halves time.
    dtype: compute (and weight) dtype; Cosmos runs the VAE in real bf16.
    temporal_window: the reference's encoder chunk (informational; results do not depend on it).
    encode_chunk: pixel frames per scan step after frame 0; a multiple of the temporal factor.
    decode_chunk: latent frames per scan step after latent frame 0.
    latent_mean, latent_std: per-channel latent normalisation constants.
    latent_constants_dtype: dtype the constants are rounded to before use. Cosmos holds them in bf16
      and computes ``1/std`` in bf16 ("bfloat16"); the golden fixtures use exact fp32 ("float32").
  """

  base_dim: int = 96
  z_dim: int = 16
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  temporal_downsample: tuple[bool, ...] = (False, True, True)
  dtype: str = "bfloat16"
  temporal_window: int = 16
  encode_chunk: int = 4
  decode_chunk: int = 1
  latent_mean: tuple[float, ...] = LATENT_MEAN
  latent_std: tuple[float, ...] = LATENT_STD
  latent_constants_dtype: str = "bfloat16"

  def __post_init__(self):
    if len(self.temporal_downsample) != len(self.dim_mult) - 1:
      raise ValueError(f"VAEConfig: temporal_downsample needs {len(self.dim_mult) - 1} entries "
                       f"(one per stage transition), got {self.temporal_downsample}")
    if len(self.latent_mean) != self.z_dim or len(self.latent_std) != self.z_dim:
      raise ValueError(f"VAEConfig: latent_mean/latent_std need z_dim={self.z_dim} entries, got "
                       f"{len(self.latent_mean)}/{len(self.latent_std)}")
    if self.encode_chunk < 1 or self.encode_chunk % self.temporal_factor:
      raise ValueError(f"VAEConfig: encode_chunk={self.encode_chunk} must be a positive multiple of "
                       f"the temporal factor {self.temporal_factor}")
    if self.decode_chunk < 1:
      raise ValueError(f"VAEConfig: decode_chunk={self.decode_chunk} must be >= 1")

  @property
  def temporal_factor(self) -> int:
    return 2 ** sum(bool(t) for t in self.temporal_downsample)

  @property
  def spatial_factor(self) -> int:
    return 2 ** (len(self.dim_mult) - 1)

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @classmethod
  def from_config(cls, vae: Mapping[str, Any] | Any, **overrides: Any) -> VAEConfig:
    """From the ``config.vae`` section (ml_collections ConfigDict or dict); unknown fields ignored."""
    get = vae.get if hasattr(vae, "get") else lambda k, d=None: getattr(vae, k, d)
    kw: dict[str, Any] = {}
    for src, dst in (("base_dim", "base_dim"), ("z_dim", "z_dim"), ("dtype", "dtype"),
                     ("temporal_window", "temporal_window"), ("encode_chunk", "encode_chunk"),
                     ("decode_chunk", "decode_chunk"),
                     ("latent_constants_dtype", "latent_constants_dtype")):
      val = get(src, None)
      if val is not None:
        kw[dst] = val
    kw.update(overrides)
    return cls(**kw)

  @classmethod
  def from_fixture(cls, config_json: Mapping[str, Any] | str | os.PathLike, **overrides: Any
                  ) -> VAEConfig:
    """From a golden fixture's ``config.json`` (``model_kwargs`` + fp32 latent constants)."""
    if not isinstance(config_json, Mapping):
      with open(config_json) as f:
        config_json = json.load(f)
    mk = config_json["model_kwargs"]
    if mk.get("attn_scales"):
      raise ValueError(f"VAEConfig.from_fixture: attn_scales={mk['attn_scales']} is not supported "
                       "(the released model has none)")
    kw: dict[str, Any] = dict(
        base_dim=int(mk["dim"]), z_dim=int(mk["z_dim"]), dim_mult=tuple(int(m) for m in mk["dim_mult"]),
        num_res_blocks=int(mk["num_res_blocks"]),
        temporal_downsample=tuple(bool(t) for t in mk["temperal_downsample"]),
        temporal_window=int(mk.get("temporal_window", 16)), dtype="float32",
        latent_mean=tuple(float(v) for v in config_json["latent_mean"]),
        latent_std=tuple(float(v) for v in config_json["latent_std"]),
        latent_constants_dtype="float32")
    kw.update(overrides)
    return cls(**kw)


# ------------------------------------------------------------------------------------------------
# Block layout (shared with the weight converter).


@dataclasses.dataclass(frozen=True)
class Block:
  """One entry of ``encoder.downsamples`` / ``decoder.upsamples`` (``index`` is the torch index)."""

  index: int
  kind: str  # "residual" | "downsample2d" | "downsample3d" | "upsample2d" | "upsample3d"
  in_dim: int
  out_dim: int


def encoder_dims(cfg: VAEConfig) -> list[int]:
  return [cfg.base_dim * m for m in (1, *cfg.dim_mult)]


def decoder_dims(cfg: VAEConfig) -> list[int]:
  return [cfg.base_dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]


def encoder_blocks(cfg: VAEConfig) -> list[Block]:
  """``Encoder3d.downsamples``: residual blocks per stage, then a downsampler between stages."""
  dims, blocks = encoder_dims(cfg), []
  for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
    for _ in range(cfg.num_res_blocks):
      blocks.append(Block(len(blocks), "residual", din, dout))
      din = dout
    if i != len(cfg.dim_mult) - 1:
      mode = "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"
      blocks.append(Block(len(blocks), mode, dout, dout))
  return blocks


def decoder_blocks(cfg: VAEConfig) -> list[Block]:
  """``Decoder3d.upsamples``: ``num_res_blocks + 1`` residual blocks per stage, then an upsampler.

  Every upsampler halves the channels, so stages after the first start from ``in_dim // 2``.
  """
  dims, blocks = decoder_dims(cfg), []
  t_up = cfg.temporal_downsample[::-1]
  for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
    if i > 0:
      din //= 2
    for _ in range(cfg.num_res_blocks + 1):
      blocks.append(Block(len(blocks), "residual", din, dout))
      din = dout
    if i != len(cfg.dim_mult) - 1:
      mode = "upsample3d" if t_up[i] else "upsample2d"
      blocks.append(Block(len(blocks), mode, dout, dout // 2))
  return blocks


# ------------------------------------------------------------------------------------------------
# Modules.


def _run_block(blk: Block, name: str, x: Array, first: bool) -> Array:
  if blk.kind == "residual":
    return ResidualBlock(blk.out_dim, name=name)(x)
  return Resample(blk.kind, name=name)(x, first)


class Encoder(nn.Module):
  """``Encoder3d``: one chunk of pixels ``[B, T, H, W, 3]`` -> moments ``[B, T/4, H/8, W/8, 2z]``."""

  cfg: VAEConfig

  @nn.compact
  def __call__(self, x: Array, first: bool) -> Array:
    x = CausalConv3d(encoder_dims(self.cfg)[0], name="conv1")(x)
    for blk in encoder_blocks(self.cfg):
      x = _run_block(blk, f"downsamples_{blk.index}", x, first)
    x = _middle_block(x)
    return _head(x, 2 * self.cfg.z_dim)


class Decoder(nn.Module):
  """``Decoder3d``: one chunk of latents ``[B, t, h, w, z]`` -> pixels ``[B, T, 8h, 8w, 3]``."""

  cfg: VAEConfig

  @nn.compact
  def __call__(self, z: Array, first: bool) -> Array:
    x = CausalConv3d(decoder_dims(self.cfg)[0], name="conv1")(z)
    x = _middle_block(x)
    for blk in decoder_blocks(self.cfg):
      x = _run_block(blk, f"upsamples_{blk.index}", x, first)
    return _head(x, 3)


def _middle_block(x: Array) -> Array:
  c = x.shape[-1]
  x = ResidualBlock(c, name="middle_0")(x)
  x = AttentionBlock(name="middle_1")(x)
  return ResidualBlock(c, name="middle_2")(x)


def _head(x: Array, out_ch: int) -> Array:
  x = nn.silu(RMSNorm(name="head_norm")(x))
  return CausalConv3d(out_ch, name="head_conv")(x)


class WanVAEModule(nn.Module):
  """``WanVAE_``: encoder + 1x1x1 ``conv1`` (moments), 1x1x1 ``conv2`` + decoder."""

  cfg: VAEConfig

  def setup(self):
    z = self.cfg.z_dim
    self.encoder = Encoder(self.cfg)
    self.conv1 = CausalConv3d(2 * z, (1, 1, 1), cached=False)
    self.conv2 = CausalConv3d(z, (1, 1, 1), cached=False)
    self.decoder = Decoder(self.cfg)

  def encode_chunk(self, x: Array, first: bool) -> Array:
    """Pixels ``[B, T, H, W, 3]`` -> moments ``[B, t, h, w, 2z]`` (``mu`` = first z channels)."""
    return self.conv1(self.encoder(x, first))

  def decode_chunk(self, z: Array, first: bool) -> Array:
    """De-normalised latents ``[B, t, h, w, z]`` -> pixels ``[B, T, H, W, 3]``."""
    return self.decoder(self.conv2(z), first)

  def __call__(self, x: Array, z: Array) -> tuple[Array, Array]:
    """Touches every parameter (a non-first chunk uses all temporal convs); used by ``init``."""
    return self.encode_chunk(x, False), self.decode_chunk(z, False)


# ------------------------------------------------------------------------------------------------
# Input checks and latent normalisation.


def check_video(video: Any, cfg: VAEConfig, where: str = "WanVAE.encode") -> None:
  """Raise ``ValueError`` unless ``video`` is ``[B, 3, 1+4k, 8m, 8n]`` floating point."""
  shape = tuple(getattr(video, "shape", ()))
  tf, sf = cfg.temporal_factor, cfg.spatial_factor
  if len(shape) != 5 or shape[1] != 3:
    raise ValueError(f"{where}: video must be [B, 3, T, H, W] (RGB, channels first, values in "
                     f"[-1, 1]); got shape {shape}")
  if not jnp.issubdtype(getattr(video, "dtype", np.float32), jnp.floating):
    raise ValueError(f"{where}: video must be floating point in [-1, 1] (uint8 x: x/127.5 - 1); "
                     f"got dtype {video.dtype}")
  b, _, t, h, w = shape
  problems = []
  if b < 1:
    problems.append(f"batch B={b} must be >= 1")
  if t < 1 or (t - 1) % tf:
    lo = max(1, 1 + (t - 1) // tf * tf)
    problems.append(f"T={t} frames is not 1+{tf}k (valid nearby: {lo} or {lo + tf})")
  for nm, v in (("H", h), ("W", w)):
    if v < sf or v % sf:
      lo = max(sf, v // sf * sf)
      problems.append(f"{nm}={v} is not a positive multiple of {sf} (valid nearby: {lo} or "
                      f"{lo + sf})")
  if problems:
    raise ValueError(f"{where}: bad video shape {shape}: " + "; ".join(problems))


def check_latents(latents: Any, cfg: VAEConfig, where: str = "WanVAE.decode") -> None:
  """Raise ``ValueError`` unless ``latents`` is ``[B, z_dim, t>=1, h>=1, w>=1]`` floating point."""
  shape = tuple(getattr(latents, "shape", ()))
  if len(shape) != 5 or shape[1] != cfg.z_dim or min(shape) < 1:
    raise ValueError(f"{where}: latents must be [B, {cfg.z_dim}, t, h, w] with all sizes >= 1; got "
                     f"shape {shape}")
  if not jnp.issubdtype(latents.dtype, jnp.floating):
    raise ValueError(f"{where}: latents must be floating point; got dtype {latents.dtype}")


def latent_constants(cfg: VAEConfig) -> tuple[np.ndarray, np.ndarray]:
  """``(mean, inv_std)`` as float32 arrays, rounded like the reference holds them."""
  mean = np.asarray(cfg.latent_mean, np.float32)
  std = np.asarray(cfg.latent_std, np.float32)
  dt = jnp.dtype(cfg.latent_constants_dtype)
  mean = mean.astype(dt).astype(np.float32)
  inv_std = (1.0 / std.astype(dt).astype(np.float32)).astype(dt).astype(np.float32)
  return mean, inv_std


def uint8_to_unit_range(video: Array) -> Array:
  """uint8 pixels -> bf16 in [-1, 1] exactly as Cosmos does it: ``x.to(bf16) / 127.5 - 1``.

  Each op rounds to bf16 (e.g. 200 -> 0.5703125, 127 -> -0.00390625, 128 -> 0.0078125, not
  0.00390625), so the model sees the same inputs as the reference (training_spec.md §5 and §12
  number 13). The rounding is forced with ``lax.reduce_precision`` so XLA's excess-precision
  rewrites cannot skip the intermediate bf16 rounding under ``jit``. The one implementation: training
  (``training/step.normalize_video``) and inference feed the VAE through it.
  """
  x = jnp.asarray(video).astype(jnp.float32)  # uint8 values are exact in bf16 and f32
  x = jax.lax.reduce_precision(x / jnp.float32(127.5), exponent_bits=8, mantissa_bits=7)
  x = jax.lax.reduce_precision(x - jnp.float32(1.0), exponent_bits=8, mantissa_bits=7)
  return x.astype(jnp.bfloat16)


def _bcast(v: np.ndarray) -> Array:
  return jnp.asarray(v)[None, :, None, None, None]


# ------------------------------------------------------------------------------------------------
# Whole-clip encode / decode.


def _cast(params: Params, dtype: jnp.dtype) -> Params:
  return jax.tree_util.tree_map(lambda a: jnp.asarray(a).astype(dtype), params)


def _scan_chunks(module: WanVAEModule, method: str, params: Params, cache: Any, chunks: Array
                 ) -> Array:
  """Run ``method`` over ``chunks`` ``[n, B, c, ...]`` with the causal cache as carry."""

  def body(carry, xc):
    out, new = module.apply({"params": params, CACHE: carry}, xc, False, method=method,
                            mutable=[CACHE])
    return new[CACHE], out

  _, outs = jax.lax.scan(body, cache, chunks)
  return outs


def encode_moments(cfg: VAEConfig, params: Params, video: Array) -> Array:
  """Raw moments ``[B, 2z, t, h, w]`` (output of ``conv1``) in ``cfg.dtype``; not jitted."""
  check_video(video, cfg)
  module = WanVAEModule(cfg)
  dtype = cfg.compute_dtype
  p = _cast(params, dtype)
  b, _, t, h, w = video.shape
  video = jnp.asarray(video).astype(dtype)
  x0 = jnp.transpose(video[:, :, :1], (0, 2, 3, 4, 1))
  m0, cache = module.apply({"params": p}, x0, True, method="encode_chunk", mutable=[CACHE])
  m0 = jnp.transpose(m0, (0, 4, 1, 2, 3))
  if t == 1:
    return m0
  c = cfg.encode_chunk
  n = -(-(t - 1) // c)
  rest = video[:, :, 1:]
  if n * c != t - 1:
    rest = jnp.pad(rest, ((0, 0), (0, 0), (0, n * c - (t - 1)), (0, 0), (0, 0)))
  # [B, 3, n*c, H, W] -> [n, B, c, H, W, 3] (one transpose, done once for the whole clip).
  rest = jnp.transpose(rest.reshape(b, 3, n, c, h, w), (2, 0, 3, 4, 5, 1))
  ms = _scan_chunks(module, "encode_chunk", p, cache[CACHE], rest)  # [n, B, c/4, h, w, 2z]
  ms = jnp.transpose(ms, (1, 5, 0, 2, 3, 4))
  ms = ms.reshape(*ms.shape[:2], -1, *ms.shape[4:])[:, :, :(t - 1) // cfg.temporal_factor]
  return jnp.concatenate([m0, ms], axis=2)


def encode_mean(cfg: VAEConfig, params: Params, video: Array) -> Array:
  """Video ``[B, 3, 1+4k, H, W]`` in [-1, 1] -> posterior mean ``[B, z, 1+k, H/8, W/8]`` in ``cfg.dtype``.

  Before the latent normalisation: what the latent cache stores (``data/latent_cache.py``), so that
  :func:`normalize_latents` of a cached mean equals :func:`encode_video` of the same clip bit for bit.
  """
  return encode_moments(cfg, params, video)[:, :cfg.z_dim]


def normalize_latents(cfg: VAEConfig, mu: Array) -> Array:
  """Posterior mean (any float dtype) -> normalised fp32 latents ``(mu - mean) / std``.

  A bf16 mean is used at bf16 precision, as the reference's bf16 VAE returns it: the rounding is
  forced with ``lax.reduce_precision``, because under ``jit`` XLA may otherwise keep the producing
  convolution's fp32 result (excess precision), and a mean read back from the latent cache would
  then differ from one encoded in the same program.
  """
  mu = jnp.asarray(mu)
  x = mu.astype(jnp.float32)
  if mu.dtype != jnp.float32:
    info = jnp.finfo(mu.dtype)
    x = jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)
  mean, inv_std = latent_constants(cfg)
  return (x - _bcast(mean)) * _bcast(inv_std)


def encode_video(cfg: VAEConfig, params: Params, video: Array) -> Array:
  """Video ``[B, 3, 1+4k, H, W]`` in [-1, 1] -> normalised latents ``[B, z, 1+k, H/8, W/8]`` fp32.

  Only the posterior mean is kept (no sampling). Pure and traceable; not jitted.
  """
  return normalize_latents(cfg, encode_mean(cfg, params, video))


def decode_latents(cfg: VAEConfig, params: Params, latents: Array) -> Array:
  """Normalised latents ``[B, z, t, h, w]`` -> video ``[B, 3, 1+4(t-1), 8h, 8w]`` fp32, unclamped."""
  check_latents(latents, cfg)
  module = WanVAEModule(cfg)
  dtype = cfg.compute_dtype
  p = _cast(params, dtype)
  mean, inv_std = latent_constants(cfg)
  z = jnp.asarray(latents).astype(jnp.float32) / _bcast(inv_std) + _bcast(mean)
  z = jnp.transpose(z, (0, 2, 3, 4, 1)).astype(dtype)  # [B, t, h, w, z]
  b, t = z.shape[:2]
  y0, cache = module.apply({"params": p}, z[:, :1], True, method="decode_chunk", mutable=[CACHE])
  y0 = jnp.transpose(y0, (0, 4, 1, 2, 3)).astype(jnp.float32)
  if t == 1:
    return y0
  d = cfg.decode_chunk
  n = -(-(t - 1) // d)
  rest = z[:, 1:]
  if n * d != t - 1:
    rest = jnp.pad(rest, ((0, 0), (0, n * d - (t - 1)), (0, 0), (0, 0), (0, 0)))
  rest = jnp.moveaxis(rest.reshape(b, n, d, *rest.shape[2:]), 1, 0)  # [n, B, d, h, w, z]
  ys = _scan_chunks(module, "decode_chunk", p, cache[CACHE], rest)  # [n, B, 4d, H, W, 3]
  ys = jnp.transpose(ys, (1, 5, 0, 2, 3, 4)).astype(jnp.float32)
  ys = ys.reshape(*ys.shape[:2], -1, *ys.shape[4:])[:, :, :(t - 1) * cfg.temporal_factor]
  return jnp.concatenate([y0, ys], axis=2)


def init_params(cfg: VAEConfig, rng: Array) -> Params:
  """Random fp32 parameters (``{'encoder', 'conv1', 'conv2', 'decoder'}``); for tests/benchmarks."""
  x, z = _init_inputs(cfg)
  return jax.jit(WanVAEModule(cfg).init)(rng, x, z)["params"]


def abstract_params(cfg: VAEConfig) -> Params:
  """Parameter shapes/dtypes as ``jax.ShapeDtypeStruct`` (no compute, no memory)."""
  x, z = _init_inputs(cfg)
  return jax.eval_shape(WanVAEModule(cfg).init, jax.random.key(0), x, z)["params"]


def _init_inputs(cfg: VAEConfig) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
  s = cfg.spatial_factor
  x = jnp.zeros((1, cfg.temporal_factor, s, s, 3), jnp.float32)
  z = jnp.zeros((1, 1, 1, 1, cfg.z_dim), jnp.float32)
  return x, z


class WanVAE:
  """Convenience wrapper: a config plus jitted ``encode``/``decode`` (params passed explicitly)."""

  def __init__(self, cfg: VAEConfig):
    self.cfg = cfg
    self.module = WanVAEModule(cfg)
    self.encode = jax.jit(functools.partial(encode_video, cfg))
    self.decode = jax.jit(functools.partial(decode_latents, cfg))

  def init_params(self, rng: Array) -> Params:
    return init_params(self.cfg, rng)

  def abstract_params(self) -> Params:
    return abstract_params(self.cfg)

  def latent_shape(self, video_shape: tuple[int, ...]) -> tuple[int, ...]:
    """``[B, 3, T, H, W]`` -> ``[B, z, 1 + (T-1)/4, H/8, W/8]`` (checks the shape)."""
    check_video(jax.ShapeDtypeStruct(tuple(video_shape), jnp.float32), self.cfg,
                "WanVAE.latent_shape")
    b, _, t, h, w = video_shape
    s = self.cfg.spatial_factor
    return (b, self.cfg.z_dim, 1 + (t - 1) // self.cfg.temporal_factor, h // s, w // s)

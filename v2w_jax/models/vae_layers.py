"""Building blocks of the Wan2.1 video VAE (channels-last, chunk-causal).

Every module works on one temporal *chunk* of a clip in ``[B, T, H, W, C]`` layout. Temporal
convolutions keep a fixed-size history of their own input frames in the Flax variable collection
``"cache"`` (initialised to zeros), so a clip can be processed chunk by chunk (``lax.scan`` over
chunks with the cache as carry) and give exactly the whole-clip result: zero history equals the
reference's zero causal padding. Only the two 3-D resamplers care whether a chunk holds frame 0
(``first=True``): they pass that frame through without their time convolution.

Semantics follow shared/reference/vae_spec.md §3 (RMS norm over channels, zero causal padding,
right/bottom-only downsample padding, channel split ``(2, C)`` then frame interleave in upsample3d,
single-head per-frame attention over all ``H*W`` tokens).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

CACHE = "cache"
_RMS_EPS = 1e-12


def rms_norm(x: Array, gamma: Array) -> Array:
  """Channel-only L2 normalisation ``x / max(|x|_2, eps) * sqrt(C) * gamma`` (fp32 statistic)."""
  c = x.shape[-1]
  x32 = x.astype(jnp.float32)
  sumsq = jnp.sum(jnp.square(x32), axis=-1, keepdims=True)
  inv = jax.lax.rsqrt(jnp.maximum(sumsq, _RMS_EPS * _RMS_EPS))
  y = x32 * inv * (math.sqrt(c) * gamma.astype(jnp.float32))
  return y.astype(x.dtype)


def conv(x: Array, kernel: Array, bias: Array | None, strides: tuple[int, ...],
         padding: tuple[tuple[int, int], ...]) -> Array:
  """N-D convolution, channels last (``N...C`` input, ``...IO`` kernel)."""
  spatial = "DHW"[3 - (kernel.ndim - 2):]
  dn = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
  y = jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), window_strides=strides,
                                   padding=padding, dimension_numbers=dn)
  if bias is not None:
    y = y + bias.astype(y.dtype)
  return y


class RMSNorm(nn.Module):
  """Learned-gain RMS norm over the channel axis (Wan ``RMS_norm``, no bias)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    gamma = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    return rms_norm(x, gamma)


class CausalConv3d(nn.Module):
  """3-D convolution ``[kT, kH, kW]``; spatial zero padding ``kH//2`` on both sides.

  With ``cached=True`` the temporal padding is ``kT-1`` frames of history taken from the
  ``"cache"`` collection (zeros before the clip starts) and the last ``kT-1`` input frames are
  stored for the next chunk. With ``cached=False`` the time axis is convolved VALID.
  """

  features: int
  kernel_size: tuple[int, int, int] = (3, 3, 3)
  stride_t: int = 1
  cached: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kt, kh, kw = self.kernel_size
    cin = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (kt, kh, kw, cin, self.features),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    if self.cached and kt > 1:
      b, _, h, w, _ = x.shape
      hist = self.variable(CACHE, "hist", jnp.zeros, (b, kt - 1, h, w, cin), x.dtype)
      x = jnp.concatenate([hist.value.astype(x.dtype), x], axis=1)
      hist.value = x[:, -(kt - 1):]
    pad = ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2))
    return conv(x, kernel, bias, (self.stride_t, 1, 1), pad)


class ResidualBlock(nn.Module):
  """``RMS -> SiLU -> conv3 -> RMS -> SiLU -> conv3`` plus a 1x1x1 shortcut when widths differ."""

  features: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = nn.silu(RMSNorm(name="norm1")(x))
    h = CausalConv3d(self.features, name="conv1")(h)
    h = nn.silu(RMSNorm(name="norm2")(h))
    h = CausalConv3d(self.features, name="conv2")(h)
    if x.shape[-1] != self.features:
      x = CausalConv3d(self.features, (1, 1, 1), cached=False, name="shortcut")(x)
    return x + h


class AttentionBlock(nn.Module):
  """Single-head self-attention over the ``H*W`` positions of each frame (no temporal mixing)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, t, h, w, c = x.shape
    y = RMSNorm(name="norm")(x).reshape(b * t, h * w, c)
    qkv = nn.Dense(3 * c, dtype=x.dtype, param_dtype=jnp.float32, name="to_qkv")(y)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    scores = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores * (1.0 / math.sqrt(c)), axis=-1)
    out = jnp.einsum("nqk,nkc->nqc", probs.astype(v.dtype), v)
    out = nn.Dense(c, dtype=x.dtype, param_dtype=jnp.float32, name="proj")(out)
    return x + out.reshape(b, t, h, w, c)


class Conv2d(nn.Module):
  """Per-frame 3x3 convolution with explicit padding (applied to ``[B, T, H, W, C]``)."""

  features: int
  stride: int = 1
  padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, t, h, w, c = x.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, c, self.features),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    y = conv(x.reshape(b * t, h, w, c), kernel, bias, (self.stride, self.stride), self.padding)
    return y.reshape(b, t, *y.shape[1:])


class Resample(nn.Module):
  """Wan ``Resample``: ``downsample2d/3d`` (halve H, W; 3d also halves T) or ``upsample2d/3d``.

  The 2-D part works per frame. downsample: zero-pad right/bottom by one, 3x3 stride-2 VALID conv.
  upsample: nearest x2 (a 2x2 repeat) then a 3x3 conv to ``C//2`` channels. Temporal parts (3d
  modes only): downsample3d (after the 2-D part) keeps frame 0 and applies a kernel-3 stride-2 time
  conv to the rest, seeded with the previous chunk's last frame; upsample3d (before the 2-D part)
  keeps frame 0 and maps every later frame to two frames with a causal time conv ``C -> 2C`` whose
  history starts as zeros (frame 0 is never seen).
  """

  mode: str

  @nn.compact
  def __call__(self, x: Array, first: bool) -> Array:
    c = x.shape[-1]
    if self.mode in ("downsample2d", "downsample3d"):
      x = Conv2d(c, stride=2, padding=((0, 1), (0, 1)), name="conv")(x)
      if self.mode == "downsample3d":
        x = self._down_time(x, first)
      return x
    if self.mode in ("upsample2d", "upsample3d"):
      if self.mode == "upsample3d":
        x = self._up_time(x, first)
      x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
      return Conv2d(c // 2, name="conv")(x)
    raise ValueError(f"unknown Resample mode {self.mode!r}")

  def _down_time(self, x: Array, first: bool) -> Array:
    b, _, h, w, c = x.shape
    last = self.variable(CACHE, "last", jnp.zeros, (b, 1, h, w, c), x.dtype)
    tconv = CausalConv3d(c, (3, 1, 1), stride_t=2, cached=False, name="time_conv")
    if first:
      # Frame 0 bypasses the time conv and is the history of frames 1 and 2.
      out = x[:, :1]
      if x.shape[1] > 1:
        out = jnp.concatenate([out, tconv(x)], axis=1)
    else:
      out = tconv(jnp.concatenate([last.value.astype(x.dtype), x], axis=1))
    last.value = x[:, -1:]
    return out

  def _up_time(self, x: Array, first: bool) -> Array:
    b, _, h, w, c = x.shape
    hist = self.variable(CACHE, "hist", jnp.zeros, (b, 2, h, w, c), x.dtype)
    tconv = CausalConv3d(2 * c, (3, 1, 1), cached=False, name="time_conv")
    head, rest = (x[:, :1], x[:, 1:]) if first else (None, x)
    if rest.shape[1]:
      xp = jnp.concatenate([hist.value.astype(x.dtype), rest], axis=1)
      hist.value = xp[:, -2:]
      rest = _interleave(tconv(xp), c)
      return rest if head is None else jnp.concatenate([head, rest], axis=1)
    return head


def _interleave(y: Array, c: int) -> Array:
  """``[B, T, H, W, 2C] -> [B, 2T, H, W, C]``: channels ``[0, C)`` become the even frames."""
  b, t, h, w, _ = y.shape
  y = y.reshape(b, t, h, w, 2, c)
  y = jnp.moveaxis(y, 4, 2)
  return y.reshape(b, 2 * t, h, w, c)

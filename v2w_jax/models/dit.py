"""The Cosmos-Predict2.5 Video2World DiT (reference ``MinimalV1LVGDiT``) as a Flax Linen module.

Used as a pure function: ``DiT(cfg).apply({'params': params}, x, t, text, cond_mask, ...)``.
Numerics follow ``reference/dit_spec.md``; with ``dtype='float32'`` the whole forward is fp32 and
matches the reference fixtures.

How a trainer uses it::

    cfg = DiTConfig.from_config(config.model, logical_axis_rules=config.mesh.rules)
    # (a) abstract params (boxed ShapeDtypeStructs carrying logical axis names; nothing allocated)
    abstract = abstract_variables(cfg)            # {'params': ...}
    # (b) logical PartitionSpecs per param, then physical shardings for a mesh
    specs = param_logical_specs(abstract)['params']
    shardings = nn.logical_to_mesh_sharding(specs, mesh, cfg.logical_axis_rules)
    # born-sharded init (or load a converted checkpoint with those shardings)
    params = jax.jit(lambda k: unbox(init_variables(cfg, k))['params'], out_shardings=shardings)(key)
    # (c) the apply function (plain or boxed params both work)
    out = apply_fn(cfg)(params, x, t, text, cond_mask, padding_mask)   # fp32 [B, C_out, T, H, W]

``unbox`` strips the ``nn.Partitioned`` boxes; ``abstract_params(cfg)`` is the unboxed abstract tree
(what the checkpoint converter maps). Blocks are stacked under ``params['blocks']`` with a leading
``num_blocks`` axis (logical name ``layers``) when ``cfg.scan_blocks``, else ``params['blocks_{i}']``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from v2w_jax.models import remat as remat_lib
from v2w_jax.models.blocks import X_NAMES, Block, FinalLayer
from v2w_jax.models.dit_config import DiTConfig
from v2w_jax.models.embeddings import rope_angles, timestep_sinusoid
from v2w_jax.models.layers import RMSNorm, dense
from v2w_jax.parallel import rules as R


def resize_padding_mask(padding_mask: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
  """Nearest resize ``[B, 1, Hp, Wp] → [B, 1, H, W]`` picking pixel ⌊i·Hp/H⌋ (torch 'nearest')."""
  hp, wp = padding_mask.shape[-2:]
  ih = np.minimum(np.floor(np.arange(height, dtype=np.float32) * np.float32(hp / height)), hp - 1)
  iw = np.minimum(np.floor(np.arange(width, dtype=np.float32) * np.float32(wp / width)), wp - 1)
  return padding_mask[:, :, ih.astype(np.int32)][:, :, :, iw.astype(np.int32)]


def patchify(x: jnp.ndarray, pt: int, p: int) -> jnp.ndarray:
  """``[B, C, T, H, W] → [B, T', H', W', C·pt·p·p]``, features in (c, pt, ph, pw) order."""
  b, c, t, h, w = x.shape
  x = x.reshape(b, c, t // pt, pt, h // p, p, w // p, p)
  x = x.transpose(0, 2, 4, 6, 1, 3, 5, 7)
  return x.reshape(b, t // pt, h // p, w // p, c * pt * p * p)


def unpatchify(y: jnp.ndarray, pt: int, p: int, channels: int) -> jnp.ndarray:
  """``[B, T', H', W', p·p·pt·C] → [B, C, T, H, W]``; features in (ph, pw, pt, c) order."""
  b, t, h, w, _ = y.shape
  y = y.reshape(b, t, h, w, p, p, pt, channels)
  y = y.transpose(0, 7, 1, 6, 2, 4, 3, 5)
  return y.reshape(b, channels, t * pt, h * p, w * p)


class PatchEmbed(nn.Module):
  cfg: DiTConfig

  @nn.compact
  def __call__(self, tokens: jnp.ndarray) -> jnp.ndarray:
    cfg = self.cfg
    return dense(cfg.model_channels, (R.PATCH, R.EMBED), dtype=cfg.jnp_dtype,
                 param_dtype=cfg.jnp_param_dtype, name="proj")(tokens)


class TimestepMLP(nn.Module):
  """fp32 island (a): ``linear_2(SiLU(linear_1(sinusoid)))`` → the shared AdaLN-LoRA addend [.., 3D]."""

  cfg: DiTConfig

  @nn.compact
  def __call__(self, sinusoid: jnp.ndarray) -> jnp.ndarray:
    cfg = self.cfg
    d = cfg.model_channels
    kw = dict(dtype=jnp.float32, param_dtype=cfg.jnp_param_dtype)
    h = dense(d, (R.EMBED, R.ADALN), name="linear_1", **kw)(sinusoid)
    return dense(3 * d, (R.EMBED, R.ADALN), name="linear_2", **kw)(nn.silu(h))


def _block_stack(cfg: DiTConfig):
  """The block class with remat (per cfg.remat_policy) and, if cfg.scan_blocks, under nn.scan."""
  block = Block
  if cfg.remat_policy != "none":
    block = nn.remat(block, policy=remat_lib.checkpoint_policy(cfg.remat_policy),
                     prevent_cse=not cfg.scan_blocks)
  if cfg.scan_blocks:
    block = nn.scan(
        block,
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast,) * 5,
        length=cfg.num_blocks,
        metadata_params={nn.PARTITION_NAME: R.LAYERS},
    )
  return block


def _final_layer(cfg: DiTConfig):
  """FinalLayer, recomputed in the backward whenever the blocks are remat'd.

  Its fp32 LayerNorm keeps four ``tokens x D`` float32 intermediates for the backward (2.6 GiB at
  720p, more than a block's input); recomputing it costs one LayerNorm and a D → 64 matmul.
  """
  if cfg.remat_policy == "none":
    return FinalLayer
  return nn.remat(FinalLayer, policy=jax.checkpoint_policies.nothing_saveable)


class DiT(nn.Module):
  """``MinimalV1LVGDiT`` forward: velocity prediction, fp32 ``[B, out_channels, T, H, W]``."""

  cfg: DiTConfig

  @nn.compact
  def __call__(
      self,
      x_B_C_T_H_W: jnp.ndarray,
      timesteps_B_T: jnp.ndarray,
      crossattn_emb: jnp.ndarray,
      condition_video_input_mask_B_C_T_H_W: jnp.ndarray,
      padding_mask: jnp.ndarray | None = None,
      is_image: bool = False,
  ) -> jnp.ndarray:
    """Args follow the reference ``forward``.

    Args:
      x_B_C_T_H_W: noisy latent ``[B, in_channels, T, H, W]``.
      timesteps_B_T: raw timesteps in [0, 1000] (scaled by ``timestep_scale`` here): [B], [B, 1]
        (shared by all frames) or [B, T'] (per latent frame).
      crossattn_emb: text embedding ``[B, N, text_in_channels]``.
      condition_video_input_mask_B_C_T_H_W: ``[B, 1, T, H, W]``, 1 on conditional frames.
      padding_mask: ``[B, 1, Hp, Wp]`` at pixel resolution (1 = padded); None = no padding.
      is_image: static; True appends a zero channel instead of the condition mask.
    """
    cfg = self.cfg
    dtype, d = cfg.jnp_dtype, cfg.model_channels
    b, c, t, h, w = x_B_C_T_H_W.shape
    pt, p = cfg.patch_temporal, cfg.patch_spatial
    if c != cfg.in_channels:
      raise ValueError(f"x_B_C_T_H_W has {c} channels, the DiT expects in_channels={cfg.in_channels}")
    if t % pt or h % p or w % p:
      raise ValueError(f"latent T×H×W = {t}×{h}×{w} not divisible by patch ({pt}, {p}, {p})")
    tp, hp, wp = t // pt, h // p, w // p
    max_t, max_h, max_w = cfg.rope_max_patches
    if tp > max_t or hp > max_h or wp > max_w:
      raise ValueError(f"{tp}×{hp}×{wp} patches exceed the RoPE limits {max_t}×{max_h}×{max_w}")

    # 4.1 channel assembly: latent, condition mask (or zeros for images), resized padding mask.
    x = x_B_C_T_H_W.astype(dtype)
    cond = (jnp.zeros((b, 1, t, h, w), dtype) if is_image
            else condition_video_input_mask_B_C_T_H_W.astype(dtype))
    parts = [x, cond]
    if cfg.concat_padding_mask:
      if padding_mask is None:
        pad = jnp.zeros((b, 1, h, w), dtype)
      else:
        pad = resize_padding_mask(padding_mask, h, w).astype(dtype)
      parts.append(jnp.broadcast_to(pad[:, :, None], (b, 1, t, h, w)))
    x = jnp.concatenate(parts, axis=1)
    self.sow("intermediates", "x_embedder_in", x)

    # 4.2 patch embedding.
    x = PatchEmbed(cfg, name="x_embedder")(patchify(x, pt, p))
    x = nn.with_logical_constraint(x, X_NAMES, rules=cfg.logical_axis_rules)
    self.sow("intermediates", "x_embedder_out", x)

    # 4.3 text projection.
    context = crossattn_emb.astype(dtype)
    if cfg.use_crossattn_projection:
      context = dense(cfg.crossattn_emb_channels, (R.TEXT_IN, R.CROSS_EMBED), dtype=dtype,
                      param_dtype=cfg.jnp_param_dtype, use_bias=True, name="crossattn_proj")(context)
      context = nn.gelu(context, approximate=False)
    context = nn.with_logical_constraint(context, (R.ACT_BATCH, R.ACT_TEXT, None),
                                         rules=cfg.logical_axis_rules)
    self.sow("intermediates", "crossattn_proj_out", context)

    # 4.4 timestep embedding (fp32 island a).
    ts = jnp.asarray(timesteps_B_T, jnp.float32)
    if ts.ndim == 1:
      ts = ts[:, None]
    if ts.ndim != 2 or ts.shape[0] != b or ts.shape[1] not in (1, tp):
      raise ValueError(f"timesteps_B_T has shape {ts.shape}; expected [{b}], [{b}, 1] or [{b}, {tp}]")
    sinusoid = timestep_sinusoid(ts * jnp.float32(cfg.timestep_scale), d)
    adaln_lora = TimestepMLP(cfg, name="t_embedder")(sinusoid)
    t_emb = RMSNorm(d, (R.EMBED,), dtype=jnp.float32, param_dtype=cfg.jnp_param_dtype,
                    name="t_embedding_norm")(sinusoid)
    self.sow("intermediates", "t_sinusoid", sinusoid)
    self.sow("intermediates", "adaln_lora", adaln_lora)
    self.sow("intermediates", "t_embedding", t_emb)

    # 4.5 3-D RoPE table over global patch positions.
    angles = rope_angles(
        jnp.arange(tp), jnp.arange(hp), jnp.arange(wp),
        dims=cfg.rope_dims,
        ratios=(cfg.rope_t_extrapolation_ratio, cfg.rope_h_extrapolation_ratio,
                cfg.rope_w_extrapolation_ratio),
        bf16_exponents=cfg.rope_bf16_exponents,
    )
    self.sow("intermediates", "rope_angles", angles)
    cos, sin = jnp.cos(angles), jnp.sin(angles)

    # 4.6 blocks.
    stack = _block_stack(cfg)
    if cfg.scan_blocks:
      x, _ = stack(cfg, name="blocks")(x, t_emb, adaln_lora, context, cos, sin)
    else:
      for i in range(cfg.num_blocks):
        x, _ = stack(cfg, name=f"blocks_{i}")(x, t_emb, adaln_lora, context, cos, sin)

    # 4.7-4.8 final layer (fp32 island d) and unpatchify.
    y = _final_layer(cfg)(cfg, name="final_layer")(x, t_emb, adaln_lora)
    return unpatchify(y, pt, p, cfg.out_channels)


# ---- helpers for trainers, converters and tests ---------------------------------------------------


def dummy_inputs(cfg: DiTConfig, batch: int = 1, frames: int | None = None, height: int | None = None,
                 width: int | None = None, text_len: int = 1) -> tuple[jnp.ndarray, ...]:
  """Zero inputs ``(x, timesteps, crossattn_emb, cond_mask, padding_mask)`` for init / eval_shape.

  Defaults: one patch (T=patch_temporal, H=W=patch_spatial), one text token.
  """
  t = frames or cfg.patch_temporal
  h = height or cfg.patch_spatial
  w = width or cfg.patch_spatial
  return (
      jnp.zeros((batch, cfg.in_channels, t, h, w), jnp.float32),
      jnp.zeros((batch, 1), jnp.float32),
      jnp.zeros((batch, text_len, cfg.text_in_channels), jnp.float32),
      jnp.zeros((batch, 1, t, h, w), jnp.float32),
      jnp.zeros((batch, 1, 8 * h, 8 * w), jnp.float32),
  )


def init_variables(cfg: DiTConfig, rng: jax.Array, **sample_shape: int) -> dict[str, Any]:
  """Random variables ``{'params': boxed tree}`` (boxes carry logical axis names); jit-compatible."""
  inputs = dummy_inputs(cfg, **sample_shape)
  return {"params": jax.jit(DiT(cfg).init)(rng, *inputs)["params"]}


def abstract_variables(cfg: DiTConfig) -> dict[str, Any]:
  """``init_variables`` under ``jax.eval_shape``: boxed ShapeDtypeStructs, no memory allocated."""
  return jax.eval_shape(lambda k: init_variables(cfg, k), jax.random.key(0))


def unbox(tree: Any) -> Any:
  """Strip ``nn.Partitioned`` (and other ``AxisMetadata``) boxes: plain arrays / ShapeDtypeStructs."""
  return nn.meta.unbox(tree)


def init_params(cfg: DiTConfig, rng: jax.Array, **sample_shape: int) -> dict[str, Any]:
  """Plain (unboxed) random params."""
  return unbox(init_variables(cfg, rng, **sample_shape))["params"]


def abstract_params(cfg: DiTConfig) -> dict[str, Any]:
  """Plain (unboxed) abstract params: a tree of ``jax.ShapeDtypeStruct``."""
  return unbox(abstract_variables(cfg))["params"]


def param_logical_specs(abstract_variables_tree: Any) -> Any:
  """Logical ``PartitionSpec`` per leaf of a boxed tree (same structure, names from rules.py)."""
  return nn.get_partition_spec(abstract_variables_tree)


def apply_fn(cfg: DiTConfig) -> Callable[..., jnp.ndarray]:
  """``f(params, x, timesteps, crossattn_emb, cond_mask, padding_mask=None, is_image=False)``."""
  model = DiT(cfg)

  def f(params: Any, *args: Any, **kwargs: Any) -> jnp.ndarray:
    return model.apply({"params": params}, *args, **kwargs)

  return f


def count_params(params: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))

"""Transformer block and final layer of the DiT (dit_spec §4.6, §4.7).

Activations in the blocks are ``[B, T', H', W', D]`` in the compute dtype; the time embedding and the
shared AdaLN-LoRA addend come in as float32 ``[B, Tt, D]`` / ``[B, Tt, 3D]`` with ``Tt`` in {1, T'}
(per-frame or broadcast timesteps).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from v2w_jax.models.attention import dot_product_attention
from v2w_jax.models.dit_config import DiTConfig
from v2w_jax.models.embeddings import apply_rope
from v2w_jax.models.layers import AdaLNModulation, RMSNorm, dense, gated_residual, modulate
from v2w_jax.parallel import rules as R

# Logical names of the residual stream [B, T', H', W', D]: batch over data/fsdp, frames over context.
X_NAMES = (R.ACT_BATCH, R.ACT_LENGTH, None, None, R.ACT_EMBED)


class Attention(nn.Module):
  """Multi-head attention with per-head q/k RMSNorm; RoPE on q/k for self-attention only.

  Heads are the outer factor of the projection width (channel = head·head_dim + d).
  """

  cfg: DiTConfig
  cross: bool

  @nn.compact
  def __call__(self, x: jnp.ndarray, context: jnp.ndarray | None, rope_cos: jnp.ndarray | None,
               rope_sin: jnp.ndarray | None) -> jnp.ndarray:
    cfg = self.cfg
    d, nh, dh = cfg.model_channels, cfg.num_heads, cfg.head_dim
    kw = dict(dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype)
    kv_in = context if self.cross else x
    # Cross k/v map the text width to D: EMBED on their output axis lets FSDP shard them.
    kv_names = (R.CROSS_EMBED, R.EMBED) if self.cross else (R.EMBED, R.HEADS)
    lora = dict(lora=cfg.lora)  # adapters on the layers cfg.lora targets (models/lora.py)
    q = dense(d, (R.EMBED, R.HEADS), name="q_proj", **kw, **lora)(x)
    k = dense(d, kv_names, name="k_proj", **kw, **lora)(kv_in)
    v = dense(d, kv_names, name="v_proj", **kw, **lora)(kv_in)
    q = q.reshape(*q.shape[:-1], nh, dh)
    k = k.reshape(*k.shape[:-1], nh, dh)
    v = v.reshape(*v.shape[:-1], nh, dh)
    q = RMSNorm(dh, (R.HEAD_DIM,), name="q_norm", **kw)(q)
    k = RMSNorm(dh, (R.HEAD_DIM,), name="k_norm", **kw)(k)
    if not self.cross:
      # fp32 island (c): RoPE in fp32 on the normalised q/k, then back to the compute dtype
      # (the reference attention helper casts q/k/v to bf16 anyway).
      q = apply_rope(q, rope_cos, rope_sin).astype(cfg.jnp_dtype)
      k = apply_rope(k, rope_cos, rope_sin).astype(cfg.jnp_dtype)
    out = dot_product_attention(q, k, v, backend=cfg.attention_backend,
                                logical_axis_rules=cfg.logical_axis_rules, self_attention=not self.cross)
    out = out.reshape(*out.shape[:-2], d)
    return dense(d, (R.HEADS, R.EMBED), name="output_proj", **kw, **lora)(out)


class MLP(nn.Module):
  """``layer2(GELU_exact(layer1(x)))``, no biases."""

  cfg: DiTConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    cfg = self.cfg
    kw = dict(dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype, lora=cfg.lora)
    h = dense(cfg.mlp_hidden, (R.EMBED, R.MLP), name="layer1", **kw)(x)
    h = nn.gelu(h, approximate=False)
    return dense(cfg.model_channels, (R.MLP, R.EMBED), name="layer2", **kw)(h)


def _per_frame(v: jnp.ndarray) -> jnp.ndarray:
  """[B, Tt, D] → [B, Tt, 1, 1, D] (broadcast over H', W')."""
  return v[:, :, None, None, :]


class Block(nn.Module):
  """Self-attention, cross-attention and MLP, each AdaLN-LoRA modulated and gated.

  ``__call__`` returns ``(x, None)`` so the block can be the body of ``nn.scan``.
  """

  cfg: DiTConfig

  def _modulation(self, name: str, t_emb: jnp.ndarray, adaln_lora: jnp.ndarray):
    cfg = self.cfg
    m = AdaLNModulation(cfg.model_channels, cfg.adaln_lora_dim, 3, param_dtype=cfg.jnp_param_dtype,
                        name=name)(t_emb)
    self.sow("intermediates", f"{name}_noLoRA", m)
    m = (m + adaln_lora).astype(cfg.jnp_dtype)  # fp32 island (b) ends here
    shift, scale, gate = jnp.split(m, 3, axis=-1)
    return _per_frame(shift), _per_frame(scale), _per_frame(gate)

  @nn.compact
  def __call__(self, x: jnp.ndarray, t_emb: jnp.ndarray, adaln_lora: jnp.ndarray,
               context: jnp.ndarray, rope_cos: jnp.ndarray, rope_sin: jnp.ndarray):
    cfg = self.cfg
    b, t, h, w, d = x.shape
    x = nn.with_logical_constraint(x, X_NAMES, rules=cfg.logical_axis_rules)

    shift, scale, gate = self._modulation("adaln_modulation_self_attn", t_emb, adaln_lora)
    hid = modulate(x, shift, scale).reshape(b, t * h * w, d)
    attn = Attention(cfg, cross=False, name="self_attn")(hid, None, rope_cos, rope_sin)
    self.sow("intermediates", "self_attn_out", attn)
    x = gated_residual(x, gate, attn.reshape(b, t, h, w, d))

    shift, scale, gate = self._modulation("adaln_modulation_cross_attn", t_emb, adaln_lora)
    hid = modulate(x, shift, scale).reshape(b, t * h * w, d)
    attn = Attention(cfg, cross=True, name="cross_attn")(hid, context, None, None)
    self.sow("intermediates", "cross_attn_out", attn)
    x = gated_residual(x, gate, attn.reshape(b, t, h, w, d))

    shift, scale, gate = self._modulation("adaln_modulation_mlp", t_emb, adaln_lora)
    mlp = MLP(cfg, name="mlp")(modulate(x, shift, scale))
    self.sow("intermediates", "mlp_out", mlp)
    x = gated_residual(x, gate, mlp)

    x = nn.with_logical_constraint(x, X_NAMES, rules=cfg.logical_axis_rules)
    self.sow("intermediates", "out", x)
    return x, None


class FinalLayer(nn.Module):
  """fp32 island (d): LayerNorm, (shift, scale) modulation, Linear D → p·p·pt·C_out."""

  cfg: DiTConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray, t_emb: jnp.ndarray, adaln_lora: jnp.ndarray) -> jnp.ndarray:
    cfg = self.cfg
    d = cfg.model_channels
    m = AdaLNModulation(d, cfg.adaln_lora_dim, 2, param_dtype=cfg.jnp_param_dtype,
                        name="adaln_modulation")(t_emb)
    self.sow("intermediates", "adaln_noLoRA", m)
    m = m + adaln_lora[..., : 2 * d]
    shift, scale = jnp.split(m, 2, axis=-1)
    hid = modulate(x.astype(jnp.float32), _per_frame(shift), _per_frame(scale))
    y = dense(cfg.patch_out_features, (R.EMBED, R.PATCH), dtype=jnp.float32,
              param_dtype=cfg.jnp_param_dtype, name="linear")(hid)
    self.sow("intermediates", "out", y)
    return y

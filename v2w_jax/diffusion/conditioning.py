"""Video2World conditioning: conditional latent frames, the mask channel and caption dropout.

training_spec §3-§4. Per sample, N conditional latent frames are drawn from
``conditioning.conditional_frames_probs`` (index = N; reference {0: .5, 1: .25, 2: .25}); a batch may
force N per sample with the key ``num_conditional_frames`` (int32 [B], −1 = draw). The first N latent
frames of the network input are the clean latents, the mask channel [B,1,T,H,W] is 1 there, and the
objective replaces the prediction on those frames by the exact target. Image batches (T = 1) always
get N = 0 and the model's ``is_image`` flag. Caption dropout multiplies each sample's whole text
embedding by Bernoulli(1 − rate): a dropped caption is all zeros, not an empty-string embedding.

Every draw comes from a ``jax.random`` key split from the step key, so a step is a pure function of
(state, batch, key): deterministic and resumable. (The reference uses Python's ``random`` and the torch
CPU generator; only the distributions are reproduced, not the streams.)
"""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class VideoCondition:
  """Everything the objective needs besides latents and noise.

  Attributes:
    crossattn_emb: text embeddings [B,N,D] after caption dropout.
    num_conditional_frames: int32 [B].
    frame_mask_B_T: float32 [B,T], 1 on conditional latent frames.
    caption_kept: bool [B], False where the caption was dropped.
    padding_mask: optional [B,1,H,W] (pixel or latent resolution; the DiT resizes it).
    is_image: static; True for T = 1 batches.
  """

  crossattn_emb: jax.Array
  num_conditional_frames: jax.Array
  frame_mask_B_T: jax.Array
  caption_kept: jax.Array
  padding_mask: jax.Array | None = None
  is_image: bool = flax.struct.field(pytree_node=False, default=False)

  def input_mask(self, latent_shape: Sequence[int], dtype=jnp.bfloat16) -> jax.Array:
    """The mask channel [B,1,T,H,W] for a latent of shape [B,C,T,H,W]."""
    b, _, t, h, w = latent_shape
    m = self.frame_mask_B_T.astype(dtype)[:, None, :, None, None]
    return jnp.broadcast_to(m, (b, 1, t, h, w))


def validate_probs(probs: Sequence[float]) -> tuple[float, ...]:
  """Checks ``conditioning.conditional_frames_probs`` (non-negative, sums to 1)."""
  p = tuple(float(x) for x in probs)
  if not p or any(x < 0 for x in p) or abs(sum(p) - 1.0) > 1e-6:
    raise ValueError(f"conditioning.conditional_frames_probs must be non-negative and sum to 1, got {p}")
  return p


def draw_num_conditional_frames(
    key: jax.Array,
    batch_size: int,
    num_latent_frames: int,
    probs: Sequence[float],
    forced: jax.Array | None = None,
) -> jax.Array:
  """N per sample (int32 [B]): drawn from ``probs`` (index = N), or ``forced`` where forced >= 0.

  Image batches (T = 1) give 0. N is clipped to [0, T] so a short clip cannot ask for more frames
  than it has.
  """
  if num_latent_frames <= 1:
    return jnp.zeros((batch_size,), jnp.int32)
  p = jnp.asarray(validate_probs(probs), jnp.float32)
  n = jax.random.choice(key, p.shape[0], shape=(batch_size,), p=p).astype(jnp.int32)
  if forced is not None:
    forced = jnp.asarray(forced, jnp.int32).reshape((batch_size,))
    n = jnp.where(forced >= 0, forced, n)
  return jnp.clip(n, 0, num_latent_frames)


def frame_mask(num_conditional_frames_B: jax.Array, num_latent_frames: int) -> jax.Array:
  """float32 [B,T]: 1 on latent frames [0, N)."""
  t = jnp.arange(num_latent_frames, dtype=jnp.int32)[None, :]
  return (t < num_conditional_frames_B[:, None]).astype(jnp.float32)


def caption_dropout(key: jax.Array, emb_B_N_D: jax.Array, rate: float) -> tuple[jax.Array, jax.Array]:
  """Zeroes each sample's whole text embedding with probability ``rate``; returns (emb, kept [B])."""
  b = emb_B_N_D.shape[0]
  if rate <= 0.0:
    return emb_B_N_D, jnp.ones((b,), bool)
  kept = jax.random.bernoulli(key, 1.0 - rate, (b,))
  emb = emb_B_N_D * kept.astype(emb_B_N_D.dtype).reshape((b,) + (1,) * (emb_B_N_D.ndim - 1))
  return emb, kept


def make_condition(
    key: jax.Array,
    text_embeddings: jax.Array,
    latent_shape: Sequence[int],
    *,
    conditional_frames_probs: Sequence[float],
    caption_dropout_rate: float,
    forced_num_conditional_frames: jax.Array | None = None,
    padding_mask: jax.Array | None = None,
) -> VideoCondition:
  """Draws the per-sample conditioning of one (micro)batch from ``key``."""
  b, _, t = latent_shape[0], latent_shape[1], latent_shape[2]
  k_frames, k_text = jax.random.split(key)
  n = draw_num_conditional_frames(k_frames, b, t, conditional_frames_probs, forced_num_conditional_frames)
  emb, kept = caption_dropout(k_text, text_embeddings, caption_dropout_rate)
  return VideoCondition(
      crossattn_emb=emb,
      num_conditional_frames=n,
      frame_mask_B_T=frame_mask(n, t),
      caption_kept=kept,
      padding_mask=padding_mask,
      is_image=(t == 1),
  )


def condition_from_config(
    key: jax.Array,
    config,
    text_embeddings: jax.Array,
    latent_shape: Sequence[int],
    *,
    forced_num_conditional_frames: jax.Array | None = None,
    padding_mask: jax.Array | None = None,
) -> VideoCondition:
  """:func:`make_condition` with probabilities and dropout rate from ``config.conditioning``."""
  c = config.conditioning
  return make_condition(
      key,
      text_embeddings,
      latent_shape,
      conditional_frames_probs=c.conditional_frames_probs,
      caption_dropout_rate=float(c.caption_dropout),
      forced_num_conditional_frames=forced_num_conditional_frames,
      padding_mask=padding_mask,
  )

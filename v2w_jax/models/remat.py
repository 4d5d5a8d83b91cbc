"""Activation-checkpoint (remat) policies for the DiT blocks (dit_spec §7, perf_notes.md).

* ``none``: no remat; the backward keeps every intermediate.
* ``full``: each block is recomputed in the backward (saves only the block inputs).
* ``save_attention``: recompute everything except the attention results: the tensor named
  :data:`~v2w_jax.models.attention.ATTENTION_OUT_NAME` **and** every output of the cuDNN fused-attention
  forward primitive. Saving only the named output is not enough with cuDNN: its backward also needs
  the softmax statistics (the primitive's second output), and without them the forward kernel runs
  again. Mirrors the reference SAC mode ``predict2_2b_720_aggressive`` (saves the flash-attn ops).
* ``save_self_attention``: only the cuDNN *self*-attention forward's outputs (result and softmax
  statistics) are kept; everything else, cross-attention included, is recomputed. The self-attention
  forward is the one expensive thing to recompute (93 ms per layer at 720p; cross-attention sees 512
  text keys, ~165x less work). ``save_attention`` measures ~38 GiB above ``full`` at 720p (81.8 vs
  43.9 GiB with bf16 state, ``docs/performance.md``), about four ``tokens x D`` bf16 tensors per block;
  this policy keeps one (~9.5 GiB over 28 blocks): the memory of ``full`` plus a little, at about the
  speed of ``save_attention``. The LoRA recipe's policy (``configs/nemo_lora.py``). Self-attention is
  the cuDNN call whose query and key have the same shape; with the XLA attention (CPU) nothing
  matches, so it behaves as ``full``.
* ``save_dots``: ``save_attention`` plus the output of every matrix multiply; only elementwise work
  (norms, RoPE, modulation, GELU) is recomputed. About 11 extra ``tokens x D`` bf16 tensors per
  block: for short clips (480p: ~16 GiB) this is cheaper than recomputing the projections and far
  smaller than ``none``, which keeps every fp32 intermediate; at 720p it does not fit with fp32 state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from v2w_jax.models.attention import ATTENTION_OUT_NAME

POLICIES = ("none", "save_attention", "save_self_attention", "save_dots", "full")

# Forward primitives of jax's cuDNN attention (jax._src.cudnn.fused_attention_stablehlo): the custom
# VJP forward binds the *_wrapper primitive, which lowers to the plain one.
CUDNN_ATTENTION_FWD_PRIMITIVES = frozenset({
    "dot_product_attention_fwd_wrapper",
    "dot_product_attention_fwd",
})


def save_cudnn_attention_outputs(prim: Any, *_: Any, **__: Any) -> bool:
  """Policy: save the outputs (incl. softmax stats) of the cuDNN attention forward primitive."""
  return getattr(prim, "name", None) in CUDNN_ATTENTION_FWD_PRIMITIVES


def save_cudnn_self_attention_outputs(prim: Any, *avals: Any, **_: Any) -> bool:
  """Policy: save the cuDNN attention forward's outputs when its query and key have the same shape
  (self-attention; cross-attention's keys are the text tokens)."""
  if not save_cudnn_attention_outputs(prim) or len(avals) < 2:
    return False
  query, key = avals[0], avals[1]
  return tuple(getattr(query, "shape", ())) == tuple(getattr(key, "shape", (None,)))


def checkpoint_policy(name: str) -> Callable[..., bool] | None:
  """The ``jax.checkpoint`` policy for a remat mode ('none' has no policy: do not remat)."""
  if name == "full":
    return jax.checkpoint_policies.nothing_saveable
  if name in ("save_attention", "save_dots"):
    attention = jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT_NAME),
        save_cudnn_attention_outputs,
    )
    if name == "save_attention":
      return attention
    return jax.checkpoint_policies.save_from_both_policies(
        attention, jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  if name == "save_self_attention":
    return save_cudnn_self_attention_outputs
  if name == "none":
    return None
  raise ValueError(f"unknown remat policy {name!r}; expected one of {POLICIES}")

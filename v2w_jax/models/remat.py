"""Activation-checkpoint (remat) policies for the DiT blocks (dit_spec §7, perf_notes.md).

* ``none``: no remat; the backward keeps every intermediate.
* ``full``: each block is recomputed in the backward (saves only the block inputs).
* ``save_attention``: recompute everything except the attention results: every output of a fused
  attention kernel's forward primitive (cuDNN or FlashAttention-3: the attention output and the softmax
  statistics its backward needs; without them the forward kernel runs again), or, for the XLA kernel,
  the tensor named :data:`~v2w_jax.models.attention.ATTENTION_OUT_NAME`. The fused kernels' outputs are
  deliberately not named too: under ``nn.scan`` each saved value becomes its own stacked residual, so
  a named copy of the kernel's output would hold every attention output twice (18 GiB at 720p).
  Mirrors the reference SAC mode ``predict2_2b_720_aggressive`` (saves the flash-attn ops).
* ``save_self_attention``: only the fused *self*-attention forward's outputs (result and softmax
  statistics) are kept; everything else, cross-attention included, is recomputed. The self-attention
  forward is the one expensive thing to recompute (93 ms per layer at 720p; cross-attention sees 512
  text keys, ~165x less work), so this costs ``full``'s memory plus one ``tokens x D`` tensor per block
  (~9 GiB over 28 blocks at 720p) at about the speed of ``save_attention``. The LoRA recipe's policy
  (``configs/nemo_lora.py``). Self-attention is the kernel call whose query and key have the same
  shape; with the XLA attention (CPU) nothing matches, so it behaves as ``full``.
* ``offload_attention``: what ``save_attention`` keeps, moved to pinned host memory.
* ``save_dots``: ``save_attention`` plus the output of every matrix multiply; only elementwise work
  (norms, RoPE, modulation, GELU) is recomputed. About 11 extra ``tokens x D`` bf16 tensors per
  block: for short clips (480p: ~16 GiB) this is cheaper than recomputing the projections and far
  smaller than ``none``, which keeps every fp32 intermediate; at 720p it does not fit with fp32 state.
* ``offload_attention``: ``save_attention``, but the kept attention results are moved to pinned host
  memory after the forward and back for the backward (XLA overlaps the copies with the blocks'
  compute): the device then holds only the block inputs, 18 GiB less at 720p.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.ad_checkpoint

from v2w_jax.models import fa3
from v2w_jax.models.attention import ATTENTION_OUT_NAME

POLICIES = ("none", "save_attention", "save_self_attention", "save_dots", "full", "offload_attention")

# Forward primitives of jax's cuDNN attention (jax._src.cudnn.fused_attention_stablehlo): the custom
# VJP forward binds the *_wrapper primitive, which lowers to the plain one.
CUDNN_ATTENTION_FWD_PRIMITIVES = frozenset({
    "dot_product_attention_fwd_wrapper",
    "dot_product_attention_fwd",
})
# Every fused kernel's forward primitive whose outputs (attention output + softmax statistics) are kept.
ATTENTION_KERNEL_FWD_PRIMITIVES = CUDNN_ATTENTION_FWD_PRIMITIVES | {fa3.FWD_PRIMITIVE}


def save_attention_kernel_outputs(prim: Any, *_: Any, **__: Any) -> bool:
  """Policy: save the outputs (incl. softmax stats) of a fused attention kernel's forward primitive."""
  return getattr(prim, "name", None) in ATTENTION_KERNEL_FWD_PRIMITIVES


def save_self_attention_kernel_outputs(prim: Any, *avals: Any, **_: Any) -> bool:
  """Policy: save a fused attention forward's outputs when its query and key have the same shape
  (self-attention; cross-attention's keys are the text tokens)."""
  if not save_attention_kernel_outputs(prim) or len(avals) < 2:
    return False
  query, key = avals[0], avals[1]
  return tuple(getattr(query, "shape", ())) == tuple(getattr(key, "shape", (None,)))


def offload_attention_outputs(prim: Any, *_: Any, **params: Any) -> Any:
  """Policy: the attention results (as ``save_attention`` keeps them) go to pinned host memory."""
  kernel = getattr(prim, "name", None) in ATTENTION_KERNEL_FWD_PRIMITIVES
  named = getattr(prim, "name", None) == "name" and params.get("name") == ATTENTION_OUT_NAME
  if kernel or named:
    return jax.ad_checkpoint.Offloadable(src="device", dst="pinned_host")
  return jax.ad_checkpoint.Recompute


def checkpoint_policy(name: str) -> Callable[..., Any] | None:
  """The ``jax.checkpoint`` policy for a remat mode ('none' has no policy: do not remat)."""
  if name == "offload_attention":
    return offload_attention_outputs
  if name == "full":
    return jax.checkpoint_policies.nothing_saveable
  if name in ("save_attention", "save_dots"):
    attention = jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT_NAME),
        save_attention_kernel_outputs,
    )
    if name == "save_attention":
      return attention
    return jax.checkpoint_policies.save_from_both_policies(
        attention, jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  if name == "save_self_attention":
    return save_self_attention_kernel_outputs
  if name == "none":
    return None
  raise ValueError(f"unknown remat policy {name!r}; expected one of {POLICIES}")

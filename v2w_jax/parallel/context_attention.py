"""Context-parallel (Ulysses) attention over the mesh axis that shards video tokens.

With context parallelism the token sequence of a clip is split over the mesh axis that the logical
axis ``act_length`` maps to (``context`` by default). Everything outside attention is per token, so
it runs on the local shard. Attention needs the whole sequence:

* self-attention (:func:`ulysses_attention`): an all-to-all turns ``[B, L/cp, H, D]`` sequence
  shards into ``[B, L, H/cp, D]`` head shards, the local kernel (cuDNN or XLA) runs on full sequences
  for its heads, and a second all-to-all turns the result back. This is the reference's
  ``MinimalA2AAttnOp``; it needs ``heads % cp == 0``.
* cross-attention (:func:`query_sharded_attention`): queries stay sequence-sharded, the (short) text
  keys/values are whole on every device; no collective.

Both run the kernel inside ``jax.shard_map`` because the cuDNN attention partitioner rejects a
sharded sequence axis. The mesh comes from the ambient ``jax.set_mesh(mesh)`` context
(``jax.sharding.get_abstract_mesh()``), the mesh axis names from the logical-axis rules, so model code
names neither. RoPE needs nothing here: the angle table is built for global positions and each
shard multiplies the rows of its own slice (the same ``act_length`` split).

The trainer calls :func:`validate_context_parallel` at start-up so a bad mesh fails with a clear
message instead of deep inside tracing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from v2w_jax.parallel import rules as R

AttentionFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]
Mesh = jax.sharding.Mesh | jax.sharding.AbstractMesh


def mesh_axes_for(logical_name: str, rules: Sequence[tuple[str, Any]] | None = None) -> tuple[str, ...]:
  """Mesh axes a logical axis maps to under ``rules`` (first matching rule, as flax does); () if none."""
  for logical, mesh_axes in (R.DEFAULT_RULES if rules is None else rules):
    if logical != logical_name:
      continue
    if mesh_axes is None:
      return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
  return ()


@dataclasses.dataclass(frozen=True)
class ContextParallelPlan:
  """Where the token sequence and the batch are split: mesh plus axis names taken from the rules.

  Attributes:
    mesh: the (abstract or concrete) mesh the shard_map runs over.
    context_axes: mesh axes splitting the token sequence (size > 1 only).
    batch_axes: mesh axes splitting the batch (before fitting to a batch size).
  """

  mesh: Mesh
  context_axes: tuple[str, ...]
  batch_axes: tuple[str, ...]

  @property
  def size(self) -> int:
    """Context-parallel degree ``cp`` (devices sharing one clip's tokens)."""
    return math.prod(self.mesh.shape[a] for a in self.context_axes)

  def axis_name(self) -> str | tuple[str, ...]:
    return self.context_axes[0] if len(self.context_axes) == 1 else self.context_axes

  def spec(self, batch: int, sequence_sharded: bool) -> PartitionSpec:
    """``[B, L, H, D]`` spec: batch over the batch axes that divide it, L over the context axes."""
    kept, size = [], 1
    for a in self.batch_axes:
      if batch % (size * self.mesh.shape[a]) == 0:
        kept.append(a)
        size *= self.mesh.shape[a]
    batch_spec = tuple(kept) if kept else None
    return PartitionSpec(batch_spec, self.axis_name() if sequence_sharded else None, None, None)


def context_parallel_plan(rules: Sequence[tuple[str, Any]] | None = None,
                          mesh: Mesh | None = None) -> ContextParallelPlan | None:
  """The plan for ``mesh`` (default: the ambient ``jax.set_mesh`` mesh), or None without CP.

  None when there is no mesh, or the mesh axes that ``act_length`` maps to are absent, manual
  already (inside another shard_map) or of total size 1.
  """
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh is None or mesh.empty:
    return None
  manual = set(getattr(mesh, "manual_axes", ()) or ())
  names = set(mesh.axis_names)
  context = tuple(a for a in mesh_axes_for(R.ACT_LENGTH, rules)
                  if a in names and a not in manual and mesh.shape[a] > 1)
  if not context:
    return None
  batch = tuple(a for a in mesh_axes_for(R.ACT_BATCH, rules)
                if a in names and a not in manual and a not in context)
  return ContextParallelPlan(mesh=mesh, context_axes=context, batch_axes=batch)


def _check_shapes(plan: ContextParallelPlan, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                  self_attention: bool) -> None:
  cp = plan.size
  axes = "×".join(f"{a}={plan.mesh.shape[a]}" for a in plan.context_axes)
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"context-parallel attention expects [B, L, heads, head_dim] q/k/v, got "
                     f"{q.shape}, {k.shape}, {v.shape}")
  if q.shape[1] % cp:
    raise ValueError(f"context parallelism over {axes}: {q.shape[1]} tokens per sample are not divisible "
                     f"by the context-parallel degree {cp}")
  if self_attention:
    if k.shape[1] % cp:
      raise ValueError(f"context parallelism over {axes}: {k.shape[1]} key tokens are not divisible by {cp}")
    if q.shape[2] % cp:
      raise ValueError(f"context parallelism over {axes}: num_heads={q.shape[2]} is not divisible by the "
                       f"context-parallel degree {cp} (Ulysses attention splits heads across it)")


def ulysses_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, attention_fn: AttentionFn,
                      plan: ContextParallelPlan, check_vma: bool = True) -> jnp.ndarray:
  """Self-attention with sequence-sharded ``[B, L, H, D]`` q/k/v via two all-to-alls.

  Args:
    q, k, v: ``[B, L, H, D]``, logically the whole sequence (sharded over ``plan.context_axes``).
    attention_fn: the local kernel on ``[B_local, L, H/cp, D]``; it sees full sequences.
    plan: from :func:`context_parallel_plan`.
    check_vma: shard_map's typing of device-varying values; False for kernels whose primitives do not
      type it (FA3's), whose custom VJP would otherwise fail the check. Gradients stay exact: unchecked,
      shard_map's transpose sums input cotangents over the mesh axes their specs do not mention.

  Returns:
    ``[B, L, H, D]`` sharded like q. Differentiable (the all-to-alls transpose to all-to-alls).
  """
  _check_shapes(plan, q, k, v, self_attention=True)
  spec = plan.spec(q.shape[0], sequence_sharded=True)
  axis = plan.axis_name()

  def body(q, k, v):
    # [B, L/cp, H, D] → [B, L, H/cp, D]; one collective for q, k, v together when possible.
    if q.dtype == k.dtype == v.dtype and q.shape == k.shape == v.shape:
      qkv = jax.lax.all_to_all(jnp.stack([q, k, v]), axis, split_axis=3, concat_axis=2, tiled=True)
      q, k, v = qkv[0], qkv[1], qkv[2]
    else:
      q, k, v = (jax.lax.all_to_all(a, axis, split_axis=2, concat_axis=1, tiled=True) for a in (q, k, v))
    out = attention_fn(q, k, v)
    # [B, L, H/cp, D] → [B, L/cp, H, D].
    return jax.lax.all_to_all(out, axis, split_axis=1, concat_axis=2, tiled=True)

  return jax.shard_map(body, mesh=plan.mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=check_vma)(q, k, v)


def query_sharded_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, attention_fn: AttentionFn,
                            plan: ContextParallelPlan, check_vma: bool = True) -> jnp.ndarray:
  """Cross-attention: sequence-sharded queries against whole keys/values; no collective.

  Args:
    q: ``[B, Lq, H, D]`` sharded over the context axes; k, v: ``[B, Lk, H, D]`` (e.g. text tokens).
    attention_fn: the local kernel.
    plan: from :func:`context_parallel_plan`.
    check_vma: as in :func:`ulysses_attention`.
  """
  _check_shapes(plan, q, k, v, self_attention=False)
  q_spec = plan.spec(q.shape[0], sequence_sharded=True)
  kv_spec = plan.spec(k.shape[0], sequence_sharded=False)
  return jax.shard_map(attention_fn, mesh=plan.mesh, in_specs=(q_spec, kv_spec, kv_spec),
                       out_specs=q_spec, check_vma=check_vma)(q, k, v)


def _cfg_value(model_cfg: Any, name: str, default: Any = None) -> Any:
  if isinstance(model_cfg, Mapping):
    return model_cfg.get(name, default)
  return getattr(model_cfg, name, default)


def validate_context_parallel(model_cfg: Any, mesh: Mesh,
                              latent_thw: tuple[int, int, int] | None = None,
                              rules: Sequence[tuple[str, Any]] | None = None) -> int:
  """Start-up check that the mesh's context-parallel degree fits the model and the clip size.

  Args:
    model_cfg: a ``DiTConfig`` or ``config.model`` (reads num_heads, patch_temporal, patch_spatial and,
      when ``rules`` is None, logical_axis_rules).
    mesh: the device mesh (or an abstract mesh).
    latent_thw: latent (T, H, W) of one training sample; None skips the token checks.
    rules: logical-axis rules (``config.mesh.rules``); default: the model's, else ``DEFAULT_RULES``.

  Returns:
    The context-parallel degree (1 = no context parallelism).

  Raises:
    ValueError: heads, tokens per sample (T'·H'·W') or latent frames T' not divisible by the degree.
  """
  if rules is None:
    rules = _cfg_value(model_cfg, "logical_axis_rules", None)
  plan = context_parallel_plan(rules, mesh)
  if plan is None:
    return 1
  cp = plan.size
  axes = " × ".join(f"{a}={mesh.shape[a]}" for a in plan.context_axes)
  where = f"mesh {dict(mesh.shape)}: context parallelism over {axes} (degree {cp})"
  heads = int(_cfg_value(model_cfg, "num_heads"))
  if heads % cp:
    divisors = [d for d in range(1, heads + 1) if heads % d == 0]
    raise ValueError(f"{where}: num_heads={heads} is not divisible by {cp}; Ulysses attention splits the "
                     f"heads over the context axis, so the context size must be one of {divisors}")
  if latent_thw is None:
    return cp
  t, h, w = (int(s) for s in latent_thw)
  pt = int(_cfg_value(model_cfg, "patch_temporal", 1))
  p = int(_cfg_value(model_cfg, "patch_spatial", 1))
  if t % pt or h % p or w % p:
    raise ValueError(f"latent T×H×W = {t}×{h}×{w} is not divisible by the patch size ({pt}, {p}, {p})")
  tp, hp, wp = t // pt, h // p, w // p
  tokens = tp * hp * wp
  if tokens % cp:
    raise ValueError(f"{where}: {tokens} tokens per sample (T'·H'·W' = {tp}·{hp}·{wp}, latent "
                     f"{t}×{h}×{w}) are not divisible by {cp}")
  if tp % cp:
    raise ValueError(f"{where}: the residual stream is split along latent frames, and T' = {tp} "
                     f"(latent {t}×{h}×{w}, {tokens} tokens) is not divisible by {cp}; choose a frame "
                     f"count whose latent frames are a multiple of {cp}, or a smaller context size")
  return cp

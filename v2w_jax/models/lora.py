"""LoRA adapters on the DiT's linear layers, with the layout and numerics of peft's ``LoraConfig``.

A targeted linear layer computes ``y = x·W + (alpha/r)·(x·A)·B``: the base kernel ``W`` [in, out] is
frozen, ``A`` [in, r] starts like torch's default Linear init (kaiming-uniform, a=√5: U(±1/√in)) and
``B`` [r, out] at zero, so training starts from the base model exactly. In the parameter tree the
adapters sit next to the kernel they adapt (``.../q_proj/{kernel, lora_a, lora_b}``); with
``nn.scan`` they are stacked on the ``layers`` axis like every block parameter. ``A`` shares the
kernel's input axis name and ``B`` its output axis name, so FSDP and context parallelism shard them
as their base layer; the rank axis (``lora_rank``) is never split.

Targets use the reference's (peft's) rule on module names: a layer is adapted when its module path
equals a target or ends with ``.`` + target, so ``q_proj`` adapts the q projections of self- and
cross-attention in every block and ``mlp.layer1`` the first MLP layer. Only the layers the blocks
create with a spec (attention projections and MLP layers) can carry adapters.

Besides the module: tree helpers to split a parameter tree into base weights and adapters, join
them again, and merge adapters into the base kernels (for generation and export).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from v2w_jax.parallel import rules as R

# The reference's LoRA settings (``Text2WorldModelConfig``: use_lora, lora_rank, lora_alpha, targets).
REFERENCE_TARGETS = ("q_proj", "k_proj", "v_proj", "output_proj", "mlp.layer1", "mlp.layer2")
REFERENCE_RANK = 32
REFERENCE_ALPHA = 32.0

A_NAME, B_NAME = "lora_a", "lora_b"
ADAPTER_LEAVES = (A_NAME, B_NAME)

# kaiming_uniform_(a=√5) on a [r, in] torch weight: bound = gain·√3/√fan_in with gain² = 2/(1+5),
# i.e. U(-1/√in, 1/√in); variance_scaling(1/3, fan_in, uniform) on our [in, r] gives the same bound.
A_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
B_INIT = nn.initializers.zeros_init()


def parse_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
  """``"q_proj, mlp.layer1"`` or a sequence -> ``("q_proj", "mlp.layer1")`` (stripped, no empties)."""
  items = targets.split(",") if isinstance(targets, str) else list(targets)
  return tuple(t.strip() for t in items if t.strip())


@dataclasses.dataclass(frozen=True)
class LoRASpec:
  """Which layers get adapters and their rank / alpha. Hashable (a field of ``DiTConfig``).

  ``targets=None`` adapts every layer that can carry an adapter (used to list them).
  """

  rank: int
  alpha: float
  targets: tuple[str, ...] | None = REFERENCE_TARGETS

  def __post_init__(self):
    if int(self.rank) <= 0:
      raise ValueError(f"LoRA rank must be positive, got {self.rank}")
    if float(self.alpha) <= 0:
      raise ValueError(f"LoRA alpha must be positive, got {self.alpha}")
    object.__setattr__(self, "rank", int(self.rank))
    object.__setattr__(self, "alpha", float(self.alpha))
    if self.targets is not None:
      targets = parse_targets(self.targets)
      if not targets:
        raise ValueError("LoRA targets are empty: name at least one layer (e.g. 'q_proj,mlp.layer1')")
      object.__setattr__(self, "targets", targets)

  @property
  def scale(self) -> float:
    """The adapter's output factor alpha / r (peft's ``scaling``)."""
    return self.alpha / self.rank

  def matches(self, module_path: Sequence[str]) -> bool:
    """Whether the layer at ``module_path`` (Flax module names) is a target."""
    if self.targets is None:
      return True
    path = tuple(module_path)
    for target in self.targets:
      parts = tuple(target.split("."))
      if len(parts) <= len(path) and path[-len(parts):] == parts:
        return True
    return False


class LoRADense(nn.Dense):
  """``nn.Dense`` (same parameters, same numerics) plus, on a targeted layer, the LoRA branch.

  The branch runs in the compute dtype with the adapters cast to it (fp32 master adapters, bf16
  matmuls on the GPU), scaled on its rank-r intermediate, and is added to the base output.
  """

  names: tuple[str | None, str | None] = (None, None)
  lora: LoRASpec | None = None

  @nn.compact
  def __call__(self, inputs: jnp.ndarray) -> jnp.ndarray:
    y = super().__call__(inputs)
    if self.lora is None or not self.lora.matches(self.path):
      return y
    in_name, out_name = self.names
    rank = self.lora.rank
    a = self.param(A_NAME, nn.with_logical_partitioning(A_INIT, (in_name, R.LORA_RANK)),
                   (jnp.shape(inputs)[-1], rank), jnp.float32)
    b = self.param(B_NAME, nn.with_logical_partitioning(B_INIT, (R.LORA_RANK, out_name)),
                   (rank, self.features), jnp.float32)
    dtype = self.dtype or inputs.dtype
    h = jnp.dot(inputs.astype(dtype), a.astype(dtype)) * jnp.asarray(self.lora.scale, dtype)
    return y + jnp.dot(h, b.astype(dtype)).astype(y.dtype)


# ---- parameter trees: base weights <-> adapters ----------------------------------------------------


def _walk(tree: Mapping[str, Any], keep: Callable[[tuple[str, ...]], bool], prefix=()) -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      sub = _walk(v, keep, prefix + (k,))
      if sub:
        out[k] = sub
    elif keep(prefix + (k,)):
      out[k] = v
  return out


def is_adapter_path(path: Sequence[str]) -> bool:
  return bool(path) and path[-1] in ADAPTER_LEAVES


def split_params(params: Mapping[str, Any]) -> tuple[dict, dict]:
  """(base weights, adapters) of a nested-dict tree (any leaves: arrays, shapes, shardings)."""
  return (_walk(params, lambda p: not is_adapter_path(p)), _walk(params, is_adapter_path))


def join_params(base: Mapping[str, Any], adapters: Mapping[str, Any] | None) -> dict:
  """The whole tree again: ``base`` with the adapter leaves added beside their kernels."""
  if adapters is None:
    return base
  out = dict(base)
  for k, v in adapters.items():
    if isinstance(v, Mapping):
      out[k] = join_params(base.get(k, {}), v)
    else:
      out[k] = v
  return out


def has_adapters(params: Mapping[str, Any]) -> bool:
  return bool(_walk(params, is_adapter_path))


def adapter_layers(adapters: Mapping[str, Any], prefix=()) -> dict[tuple[str, ...], tuple[Any, Any]]:
  """Module path -> (A [.., in, r], B [.., r, out]) for every adapted layer."""
  out = {}
  for k, v in adapters.items():
    if isinstance(v, Mapping):
      if A_NAME in v or B_NAME in v:
        if A_NAME not in v or B_NAME not in v:
          raise ValueError(f"adapter {'/'.join(prefix + (k,))} has only one of {A_NAME}/{B_NAME}")
        out[prefix + (k,)] = (v[A_NAME], v[B_NAME])
      out.update(adapter_layers({kk: vv for kk, vv in v.items() if kk not in ADAPTER_LEAVES}, prefix + (k,)))
  return out


def adapter_rank(adapters: Mapping[str, Any]) -> int:
  """The rank r shared by all adapters (ValueError if they differ or there are none)."""
  ranks = {int(np.shape(a)[-1]) for a, _ in adapter_layers(adapters).values()}
  if len(ranks) != 1:
    raise ValueError(f"adapters must share one rank, found {sorted(ranks) or 'no adapters'}")
  return ranks.pop()


def merge_adapters(base: Mapping[str, Any], adapter_sets: Sequence[tuple[Mapping[str, Any], float]]) -> dict:
  """Base weights with ``sum_k factor_k · A_k·B_k`` added to each adapted kernel (numpy, host side).

  Args:
    base: the base parameter tree (numpy or array-likes); kernels keep their dtype.
    adapter_sets: (adapters tree, factor) pairs; factor = alpha/r times the user's blend scale.

  Each adapted kernel is computed in float32 (``W + sum factor·A@B``, one block at a time for stacked
  kernels) and rounded once to its dtype; other leaves are passed through unchanged.
  """
  deltas: dict[tuple[str, ...], list[tuple[Any, Any, float]]] = {}
  for adapters, factor in adapter_sets:
    for path, (a, b) in adapter_layers(adapters).items():
      deltas.setdefault(path, []).append((a, b, float(factor)))

  def one(path, kernel):
    w = np.array(kernel, dtype=np.float32)
    for a, b, factor in deltas[path]:
      a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
      if a32.shape[:-1] != w.shape[:-1] or b32.shape[-1] != w.shape[-1]:
        raise ValueError(f"adapter {'/'.join(path)}: A {a32.shape} / B {b32.shape} do not fit kernel {w.shape}")
      if w.ndim == 3:  # stacked blocks
        for i in range(w.shape[0]):
          w[i] += np.float32(factor) * (a32[i] @ b32[i])
      else:
        w += np.float32(factor) * (a32 @ b32)
    return w.astype(np.dtype(kernel.dtype), copy=False)

  def walk(node, prefix):
    out = {}
    for k, v in node.items():
      if isinstance(v, Mapping):
        out[k] = walk(v, prefix + (k,))
      elif k == "kernel" and prefix in deltas:
        out[k] = one(prefix, v)
      else:
        out[k] = v
    return out

  missing = [p for p in deltas if _get(base, p + ("kernel",)) is None]
  if missing:
    raise ValueError("adapters for layers the base model does not have: "
                     + ", ".join("/".join(p) for p in missing))
  return walk(base, ())


def _get(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
  node: Any = tree
  for k in path:
    if not isinstance(node, Mapping) or k not in node:
      return None
    node = node[k]
  return node


def module_name(path: Sequence[str]) -> str:
  """Dotted layer name for messages, without the block container (``self_attn.q_proj``)."""
  parts = list(path)
  if parts and (parts[0] == "blocks" or parts[0].startswith("blocks_")):
    parts = parts[1:]
  return ".".join(parts)

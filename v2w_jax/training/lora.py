"""LoRA post-training: what trains, what stays frozen, and what a checkpoint holds.

With ``config.lora.rank > 0`` (``configs/nemo_lora.py``) the DiT carries adapters on the targeted
layers (``models/lora.py``) and the train state is a :class:`LoRATrainState`:

* ``params``: the adapters only, in the dtype of ``optim.precision`` (float32 by default); the
  optimizer, schedule, clipping and EMA (``ema_params``) see nothing else;
* ``frozen``: the base weights in ``lora.base_dtype`` (bfloat16): no gradient, no fp32 master copy,
  no Adam moments, no EMA.

Both are born sharded like their layers (an adapter shares its base layer's axis names), so FSDP and
context parallelism work unchanged. The frozen base comes from ``checkpoint.load_path`` (a reference
``.pt``, a params folder or a full fine-tune's checkpoint; random from the seed when empty); the
adapters start fresh (A kaiming-uniform, B zero), from the adapters stored with the base (a
reference LoRA ``.pt``), or from ``lora.init_path``.

A checkpoint holds only :class:`TrainState` (adapters, their optimizer state and EMA) plus, in its
metadata, LoRA settings and a fingerprint of the base weights (``convert/fingerprint.py``) and their
path. Resuming (``training/resume.py`` checks the adapters' shapes against the config) loads the
base again from ``checkpoint.load_path`` and stops with :class:`BaseWeightsMismatchError` when its
fingerprint differs.
"""

from __future__ import annotations

import logging
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from v2w_jax.convert import load as load_lib
from v2w_jax.convert import lora_load
from v2w_jax.convert.fingerprint import fingerprint
from v2w_jax.convert.tree import flatten
from v2w_jax.models import dit
from v2w_jax.models import lora as lora_lib
from v2w_jax.models.dit_config import DiTConfig
from v2w_jax.parallel import sharding as sharding_lib
from v2w_jax.training import ema as ema_lib
from v2w_jax.training.optim import precision_dtypes, tree_cast
from v2w_jax.training.state import TrainState

_log = logging.getLogger(__name__)


class BaseWeightsMismatchError(ValueError):
  """A LoRA checkpoint is resumed (or its adapters used) with other base weights than it was trained on."""


@flax.struct.dataclass
class LoRATrainState(TrainState):
  frozen: Any = None  # the base weights (no gradient)


def lora_spec(config) -> lora_lib.LoRASpec | None:
  """The LoRA spec of ``config.lora`` (None when the block is absent or ``rank`` is 0: full fine-tune)."""
  section = config.get("lora") if hasattr(config, "get") else getattr(config, "lora", None)
  if section is None or int(section.get("rank", 0)) <= 0:
    return None
  try:
    return lora_lib.LoRASpec(int(section.rank), float(section.alpha), lora_lib.parse_targets(section.targets))
  except ValueError as e:
    raise ValueError(f"config.lora: {e}") from e


def base_dtype(config) -> Any:
  name = str(config.lora.get("base_dtype", "bfloat16"))
  if name not in ("bfloat16", "float32"):
    raise ValueError(f"config.lora.base_dtype={name!r}: expected 'bfloat16' or 'float32'")
  return jnp.dtype(name)


# ---- views of a state ---------------------------------------------------------------------------------


def saved_part(state: Any) -> TrainState:
  """What a checkpoint stores: the state without the frozen base (any state; works on shardings too)."""
  if not isinstance(state, LoRATrainState):
    return state
  return TrainState(step=state.step, params=state.params, opt_state=state.opt_state, ema_params=state.ema_params)


def model_params(state: Any, *, ema: bool = False) -> Any:
  """The DiT's whole parameter tree: base + adapters (regular or EMA); ``state.params`` for a full
  fine-tune. Also maps a tree of shardings."""
  params = state.ema_params if ema and state.ema_params is not None else state.params
  frozen = getattr(state, "frozen", None)
  return params if frozen is None else lora_lib.join_params(frozen, params)


def model_view(state: Any) -> Any:
  """The state with whole parameter trees in ``params`` / ``ema_params`` (for the sample writer)."""
  if not isinstance(state, LoRATrainState):
    return state
  ema = None if state.ema_params is None else model_params(state, ema=True)
  return state.replace(params=model_params(state), ema_params=ema)


# ---- building the state -------------------------------------------------------------------------------


def _check_targets(spec: lora_lib.LoRASpec, dit_cfg: DiTConfig, adapters_abstract: Any) -> None:
  """Every target names at least one layer that can carry an adapter (else one error listing them)."""
  adapted = list(lora_lib.adapter_layers(adapters_abstract))
  unmatched = [t for t in spec.targets if not any(lora_lib.LoRASpec(1, 1.0, (t,)).matches(p) for p in adapted)]
  if unmatched or not adapted:
    every = lora_lib.split_params(dit.abstract_params(dit_cfg.replace(lora=lora_lib.LoRASpec(1, 1.0, None))))[1]
    names = sorted({lora_lib.module_name(p) for p in lora_lib.adapter_layers(every)})
    raise ValueError(f"config.lora.targets: {', '.join(unmatched) or spec.targets} match no layer; layers that "
                     f"take adapters: {', '.join(names)}")


def _check_adapters(adapters: lora_load.Adapters, spec: lora_lib.LoRASpec, abstract: Any) -> None:
  want = {p: tuple(a.shape) for p, a in flatten(abstract).items()}
  got = {p: tuple(a.shape) for p, a in flatten(adapters.tree).items()}
  if got != want or adapters.spec.alpha != spec.alpha:
    raise ValueError(
        f"adapters of {adapters.source} (rank {adapters.spec.rank}, alpha {adapters.spec.alpha:g}, layers "
        f"{', '.join(adapters.spec.targets or ())}) do not fit config.lora (rank {spec.rank}, alpha {spec.alpha:g}, "
        f"targets {','.join(spec.targets)}): set --config.lora.rank/alpha/targets to the adapters' values")


def build_state(config, mesh: jax.sharding.Mesh, dit_cfg: DiTConfig, tx) -> tuple[Any, Any, Any]:
  """(abstract state with shardings, state shardings, ``initial_state()``) of a LoRA run.

  ``initial_state()`` loads (or draws) the base weights and the initial adapters and creates the
  state born sharded; the base is donated into the state, never copied.
  """
  spec = dit_cfg.lora
  boxed = dit.abstract_variables(dit_cfg)["params"]
  shardings = sharding_lib.param_shardings_from_boxed(boxed, mesh, dit_cfg.logical_axis_rules)
  base_abs, adapters_abs = lora_lib.split_params(dit.unbox(boxed))
  base_sh, adapters_sh = lora_lib.split_params(shardings)
  _check_targets(spec, dit_cfg, adapters_abs)
  param_dtype, _ = precision_dtypes(str(config.optim.get("precision", "fp32_master")))
  frozen_dtype = base_dtype(config)
  ema_enabled = bool(config.ema.get("enabled", True))

  def init(adapters, base):
    adapters = tree_cast(adapters, param_dtype)
    return LoRATrainState(step=jnp.zeros((), jnp.int32), params=adapters, opt_state=tx.init(adapters),
                          ema_params=ema_lib.init_ema(adapters) if ema_enabled else None,
                          frozen=tree_cast(base, frozen_dtype))

  abstract = jax.eval_shape(init, adapters_abs, base_abs)
  state_sh = sharding_lib.train_state_shardings(abstract, adapters_sh, tx, mesh).replace(frozen=base_sh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
  key = jax.random.key(config.seed)
  n_adapter = sum(int(a.size) for a in jax.tree.leaves(adapters_abs))
  n_base = sum(int(a.size) for a in jax.tree.leaves(base_abs))
  _log.info("LoRA rank %d alpha %g on %s: %s trainable parameters (%.3f%% of %s)", spec.rank, spec.alpha,
            ",".join(spec.targets), f"{n_adapter:,}", 100.0 * n_adapter / (n_adapter + n_base), f"{n_base:,}")

  def initial_state():
    base, stored = load_base(config, dit_cfg, abstract.frozen, key)
    adapters = _initial_adapters(config, dit_cfg, stored, abstract.params, key)
    return jax.jit(init, out_shardings=state_sh, donate_argnums=(1,))(adapters, base)

  return abstract, state_sh, initial_state


def _frozen_init_cfg(config, dit_cfg: DiTConfig) -> DiTConfig:
  """The DiT config for random draws: base weights made in their frozen dtype (no float32 copy of a
  large model on the device; adapters are float32 whatever the config)."""
  return dit_cfg.replace(param_dtype=base_dtype(config).name)


def load_base(config, dit_cfg: DiTConfig, abstract_base: Any, key: jax.Array) -> tuple[Any, Any]:
  """(base weights placed per ``abstract_base``, adapters stored with them or None)."""
  path = str(config.checkpoint.load_path or "")
  if not path:
    _log.warning("config.checkpoint.load_path is empty: the LoRA base model has RANDOM weights (seed %d)",
                 int(config.seed))
    shardings = jax.tree.map(lambda a: a.sharding, abstract_base)
    draw = lambda k: jax.tree.map(lambda x, a: x.astype(a.dtype),  # noqa: E731
                                  lora_lib.split_params(dit.init_params(_frozen_init_cfg(config, dit_cfg), k))[0],
                                  abstract_base)
    return jax.jit(draw, out_shardings=shardings)(key), None
  return lora_load.read_base_and_adapters(path, dit_cfg.replace(lora=None), abstract_base, alpha=dit_cfg.lora.alpha)


def _initial_adapters(config, dit_cfg: DiTConfig, stored: lora_load.Adapters | None, abstract: Any,
                      key: jax.Array) -> Any:
  init_path = str(config.lora.get("init_path", "") or "")
  if init_path:
    stored = lora_load.read_adapters(init_path, dit_cfg.replace(lora=None), alpha=dit_cfg.lora.alpha)
  if stored is None:
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    fresh = lambda k: lora_lib.split_params(dit.init_params(_frozen_init_cfg(config, dit_cfg), k))[1]  # noqa: E731
    return jax.jit(fresh, out_shardings=shardings)(key)
  _check_adapters(stored, dit_cfg.lora, abstract)
  _log.info("LoRA adapters start from %s", stored.source)
  return load_lib._place(stored.tree, abstract)  # pylint: disable=protected-access


# ---- checkpoints ---------------------------------------------------------------------------------------


def checkpoint_meta(state: Any, config) -> dict:
  """``{'lora': {...}}`` for a LoRA state's checkpoint metadata ({} for a full fine-tune)."""
  if not isinstance(state, LoRATrainState):
    return {}
  spec = lora_spec(config)
  dtype = base_dtype(config)
  return {"lora": {"rank": spec.rank, "alpha": spec.alpha, "targets": list(spec.targets),
                   "base_fingerprint": fingerprint(state.frozen, dtype), "base_dtype": dtype.name,
                   "base_path": str(config.checkpoint.load_path or ""), "base_seed": int(config.seed)}}


def resume_state(restored: TrainState, meta: dict, config, dit_cfg: DiTConfig, abstract_state: Any,
                 step: int) -> Any:
  """A restored checkpoint with its frozen base loaded again and checked against the fingerprint.

  A full fine-tune's state is returned unchanged.
  """
  if not isinstance(abstract_state, LoRATrainState):
    return restored
  saved = meta.get("lora") or {}
  spec = dit_cfg.lora
  if float(saved.get("alpha", spec.alpha)) != spec.alpha:  # rank and layers were checked with the state's shapes
    raise ValueError(f"the LoRA checkpoint at step {step} was trained with lora.alpha={saved['alpha']:g}, the config "
                     f"has {spec.alpha:g}: resume with --config.lora.alpha={saved['alpha']:g}")
  base, _ = load_base(config, dit_cfg, abstract_state.frozen, jax.random.key(config.seed))
  got = fingerprint(base, base_dtype(config))
  if saved.get("base_fingerprint") != got:
    path = saved.get("base_path", "")
    fix = (f"--config.checkpoint.load_path={path}" if path else
           f"an empty checkpoint.load_path and --config.seed={saved.get('base_seed', '<its seed>')} (random base)")
    raise BaseWeightsMismatchError(
        f"the LoRA checkpoint at step {step} was trained on other base weights ({path or 'random'}, fingerprint "
        f"{str(saved.get('base_fingerprint'))[:16]}) than checkpoint.load_path="
        f"{config.checkpoint.load_path or '(empty: random)'} gives (fingerprint {got[:16]}): resume with {fix}")
  return LoRATrainState(step=restored.step, params=restored.params, opt_state=restored.opt_state,
                        ema_params=restored.ema_params, frozen=base)

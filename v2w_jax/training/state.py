"""The training state pytree: step, params, optimizer state, EMA params.

``step`` counts optimizer steps taken (int32 scalar): the LR and EMA of the next update use it as the
reference's pre-increment ``iteration``. ``ema_params`` is None when ``ema.enabled`` is False.
Parameters are stored in the dtype of ``optim.precision`` (float32 master weights, or bf16 for
``reference_bf16``); the EMA is always float32.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from v2w_jax.training import ema as ema_lib
from v2w_jax.training.optim import precision_dtypes, tree_cast


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any = None


def init_train_state(
    params: Any, tx: optax.GradientTransformation, *, param_dtype=jnp.float32, ema_enabled: bool = True
) -> TrainState:
  """A fresh state from (possibly float32) parameters: cast to ``param_dtype``, fresh optimizer, EMA copy."""
  params = tree_cast(params, param_dtype)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      ema_params=ema_lib.init_ema(params) if ema_enabled else None,
  )


def state_init_fn(
    init_params_fn: Callable[..., Any], tx: optax.GradientTransformation, config
) -> Callable[..., TrainState]:
  """Wraps ``init_params_fn(*args) -> params`` into ``(*args) -> TrainState`` per ``config`` (precision,
  EMA). Jit it with ``out_shardings`` to create the state born-sharded (``parallel/sharding.py``)."""
  param_dtype, _ = precision_dtypes(str(config.optim.get("precision", "fp32_master")))
  ema_enabled = bool(config.ema.get("enabled", True))

  def init(*args):
    return init_train_state(init_params_fn(*args), tx, param_dtype=param_dtype, ema_enabled=ema_enabled)

  return init


def create_train_state_sharded(
    init_params_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    config,
    mesh: jax.sharding.Mesh,
    param_shardings: Any,
    *args: Any,
) -> tuple[TrainState, TrainState]:
  """Creates the state born-sharded: ``jax.jit(init, out_shardings=state_shardings)(*args)``.

  Args:
    init_params_fn: ``(*args) -> params`` (plain, unboxed arrays).
    param_shardings: ``NamedSharding`` per parameter (e.g. ``sharding.param_shardings_from_boxed``).

  Returns:
    (state, state_shardings); the shardings are what :func:`training.step.jit_train_step` needs.
  """
  from v2w_jax.parallel import sharding as sharding_lib  # local: keeps state.py import-light

  init = state_init_fn(init_params_fn, tx, config)
  abstract = jax.eval_shape(init, *args)
  shardings = sharding_lib.train_state_shardings(abstract, param_shardings, tx, mesh,
                                                 ema_memory_kind=ema_lib.offload_memory_kind(config.ema))
  return sharding_lib.create_sharded(init, shardings, *args), shardings

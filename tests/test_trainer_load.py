"""`checkpoint.load_path`: the trainer's initial state takes the weights of a reference `.pt`, of a
converted params folder or of another job's training checkpoint (its EMA weights) — model weights only:
fresh optimizer, step 0, EMA = the loaded weights."""

import jax
import numpy as np
import pytest

from configs import tiny
from v2w_jax.convert import dit as convert_dit
from v2w_jax.convert import params_io, torch_pt
from v2w_jax.models import dit
from v2w_jax.parallel import mesh as mesh_lib
from v2w_jax.training import optim as optim_lib
from v2w_jax.training import trainer


@pytest.fixture(scope="module")
def setup():
  config = tiny.get_config()
  cfg = trainer.dit_config(config)
  params = jax.tree.map(np.asarray, dit.init_params(cfg, jax.random.key(42)))
  return config, cfg, params


def _initial_state(config, cfg):
  mesh = mesh_lib.make_mesh(config.mesh)
  _, _, initial_state = trainer.build_state(config, mesh, cfg, optim_lib.make_optimizer(config))
  return initial_state()


@pytest.mark.parametrize("kind", ["pt", "orbax"])
def test_load_path_sets_the_initial_weights(setup, tmp_path, kind):
  config, cfg, params = setup
  if kind == "pt":
    path = tmp_path / "model_ema_fp32.pt"
    torch_pt.save(path, convert_dit.params_to_torch(params, cfg))
  else:
    path = tmp_path / "dit_params"
    params_io.save_params(path, params)
  config = config.copy_and_resolve_references()
  config.checkpoint.load_path = str(path)
  state = _initial_state(config, cfg)
  assert int(state.step) == 0
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(got), want)
  for got, want in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(got), want)


def test_load_path_of_another_model_size_fails_clearly(setup, tmp_path):
  config, cfg, params = setup
  path = tmp_path / "model.pt"
  torch_pt.save(path, convert_dit.params_to_torch(params, cfg))
  config = config.copy_and_resolve_references()
  config.checkpoint.load_path = str(path)
  config.model.model_channels = 128  # the file holds a 64-channel model
  with pytest.raises(ValueError, match=r"DiT checkpoint .*model\.pt does not fit(.|\n)*expected \[128"):
    _initial_state(config, trainer.dit_config(config))


def test_load_path_of_a_training_checkpoint_takes_its_ema_weights(setup, tmp_path):
  import optax  # pylint: disable=import-outside-toplevel

  from v2w_jax.training.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  from v2w_jax.training.state import init_train_state  # pylint: disable=import-outside-toplevel

  config, cfg, params = setup
  ema = jax.tree.map(lambda x: x * 0.5 + 0.25, params)
  ck = Checkpointer(tmp_path / "old_job" / "checkpoints", keep=1, async_save=False)
  ck.save(30, init_train_state(params, optax.sgd(1.0)).replace(ema_params=ema), None, {"step": 30})
  ck.close()
  config = config.copy_and_resolve_references()
  config.checkpoint.load_path = str(tmp_path / "old_job")
  state = _initial_state(config, cfg)
  assert int(state.step) == 0
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(ema)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

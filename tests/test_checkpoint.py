"""Checkpointer: save/restore round trip of a state pytree plus a grain iterator position."""

import grain
import jax
import jax.numpy as jnp
import numpy as np

from v2w_jax.training import checkpoint


def _iterator():
  return iter(grain.MapDataset.range(100).shuffle(seed=3).to_iter_dataset())


def test_round_trip_state_data_and_meta(tmp_path):
  state = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "step": jnp.asarray(7, jnp.int32)}
  it = _iterator()
  for _ in range(5):
    next(it)
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", keep=2)
  assert ckpt.latest_step() is None
  assert ckpt.save(7, state, it, {"step": 7, "note": "x"})
  expected_next = [next(it) for _ in range(4)]
  ckpt.wait()

  fresh = _iterator()
  restored, meta = ckpt.restore(7, checkpoint.abstract_like(state), fresh)
  assert meta == {"step": 7, "note": "x"}
  np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
  assert int(restored["step"]) == 7
  assert [next(fresh) for _ in range(4)] == expected_next
  ckpt.close()


def test_keeps_last_n(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", keep=2, async_save=False)
  state = {"w": jnp.zeros(3)}
  for step in (1, 2, 3):
    ckpt.save(step, jax.tree.map(lambda x: x + step, state), None, {"step": step})
  ckpt.wait()
  assert ckpt.all_steps() == [2, 3]
  assert ckpt.latest_step() == 3
  ckpt.close()

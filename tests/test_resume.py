"""Resume: the newest intact checkpoint, damaged ones skipped with the reason; another model is one error."""

from __future__ import annotations

import logging
import re

import grain
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from v2w_jax.training import checkpoint, resume


def _state(rows: int, offset: float = 0.0):
  return {"params": {"w": jnp.arange(rows * 300.0).reshape(rows, 300) + offset, "b": jnp.ones(3) + offset},
          "step": jnp.asarray(int(offset), jnp.int32)}


def _config(rows: int) -> ConfigDict:
  return ConfigDict({"model": {"rows": rows}, "optim": {"lr": 0.1}, "ema": {"enabled": True}, "seed": 0})


def _iterator():
  return iter(grain.MapDataset.range(100).to_iter_dataset())


@pytest.fixture
def job(tmp_path):
  """A job with checkpoints at steps 10 and 20 (the data iterator at 1 and 2 elements read)."""
  ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", keep=3, async_save=False)
  it = _iterator()
  for step in (10, 20):
    next(it)
    ckpt.save(step, _state(200, step), it, {"step": step, "config": _config(200).to_dict()})
  ckpt.close()
  return tmp_path


def _resume(job, rows=200):
  ckpt = checkpoint.Checkpointer(job / "checkpoints", keep=3, async_save=False)
  it = _iterator()
  try:
    return resume.restore_newest_intact(ckpt, checkpoint.abstract_like(_state(rows)), it, config=_config(rows),
                                        job=job), ckpt, it
  except Exception:
    ckpt.close()
    raise


def _truncate_largest_data_file(step_dir):
  data = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  data.write_bytes(data.read_bytes()[:100])


def test_intact_latest_is_restored(job):
  restored, ckpt, it = _resume(job)
  assert restored.step == 20 and restored.skipped == []
  np.testing.assert_array_equal(restored.state["params"]["b"], np.full(3, 21.0))
  assert next(it) == 2  # the data position of step 20
  ckpt.close()


@pytest.mark.parametrize("damage,reason", [
    (_truncate_largest_data_file, r"restoring it failed \(ValueError: .*params\.w"),
    (lambda d: (d / "state" / "_METADATA").unlink(), r"state/_METADATA is missing"),
], ids=["truncated_data_file", "missing_metadata"])
def test_damaged_latest_is_skipped_with_the_reason(job, caplog, damage, reason):
  damage(job / "checkpoints" / "20")
  with caplog.at_level(logging.WARNING, logger="v2w_jax.training.resume"):
    restored, ckpt, it = _resume(job)
  assert restored.step == 10
  assert [s for s, _ in restored.skipped] == [20]
  assert pytest.approx(float(restored.state["params"]["b"][0])) == 11.0 and next(it) == 1
  warnings = caplog.text
  assert "checkpoints/20 is unusable" in warnings and "resuming from step 10" in warnings
  assert any(re.search(reason, why) for _, why in restored.skipped), restored.skipped
  # Set aside, so the job's next saves are its latest checkpoints again.
  assert ckpt.all_steps() == [10] and (job / "checkpoints" / "20.corrupt").is_dir()
  ckpt.save(11, restored.state, it, {"step": 11})
  ckpt.wait()
  assert ckpt.latest_step() == 11
  ckpt.close()


def test_no_usable_checkpoint_is_an_error(job):
  for step in ("10", "20"):
    (job / "checkpoints" / step / "state" / "_METADATA").unlink()
  with pytest.raises(resume.NoUsableCheckpoint, match=r"no usable checkpoint in .*step 20: .*step 10: "):
    _resume(job)
  assert (job / "checkpoints" / "20").is_dir()  # nothing moved when nothing can be resumed


def test_another_model_is_one_error_naming_job_checkpoint_and_change(job, monkeypatch):
  def restore(*args, **kwargs):
    raise AssertionError("orbax restore must not be reached")

  monkeypatch.setattr(checkpoint.Checkpointer, "restore", restore)
  with pytest.raises(resume.IncompatibleCheckpoint) as err:
    _resume(job, rows=300)
  message = str(err.value)
  assert "\n" not in message
  assert str(job) in message and "checkpoints/20" in message
  assert "model.rows 200 -> 300" in message and "params/w: saved (200, 300) float32, now (300, 300) float32" in message


def test_tree_differences_and_config_changes():
  saved = checkpoint.abstract_like({"a": jnp.zeros((2, 3)), "b": jnp.zeros(4), "gone": jnp.zeros(1)})
  now = checkpoint.abstract_like({"a": jnp.zeros((2, 3), jnp.bfloat16), "b": jnp.zeros(4), "new": jnp.zeros(1)})
  assert sorted(resume.tree_differences(saved, now)) == sorted([
      "new is not in the checkpoint", "gone is in the checkpoint, not in the model",
      "a: saved (2, 3) float32, now (2, 3) bfloat16"])
  assert resume.tree_differences(saved, saved) == []
  before = _config(2).to_dict()
  after = _config(3)
  after.optim.lr = 0.2
  after.seed = 5  # not a state-shaping group
  assert resume.config_changes(before, after) == ["model.rows 2 -> 3", "optim.lr 0.1 -> 0.2"]
  assert resume.config_changes(None, after) == []

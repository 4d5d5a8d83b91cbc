"""MetricLogger: JSONL always, offline wandb without an account, a progress line with a bar and ETA."""

import json

from configs import tiny
from v2w_jax.training import logging as log_lib
from v2w_jax.training.logging import MetricLogger


def test_jsonl_progress_and_offline_wandb(tmp_path, capsys, monkeypatch):
  monkeypatch.delenv("WANDB_API_KEY", raising=False)
  monkeypatch.setenv("WANDB_SILENT", "true")
  config = tiny.get_config()
  config.wandb.mode = "offline"
  logger = MetricLogger(tmp_path, config, total_steps=10)
  logger.log(5, {"loss": 0.5, "lr": 1e-3})
  logger.log(5, {"loss_t100": 0.7}, prefix="val")
  logger.progress(5, {"loss": 0.5})
  logger.close()
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows[0]["step"] == 5 and rows[0]["train/loss"] == 0.5 and rows[0]["train/lr"] == 1e-3
  assert rows[1]["val/loss_t100"] == 0.7
  line = capsys.readouterr().out
  assert "[##########..........] step 5/10" in line and "eta" in line and "loss 0.5" in line
  assert list((tmp_path / "wandb").glob("offline-run-*")), "wandb wrote no offline run"


def test_eta_leaves_out_the_first_step(tmp_path, capsys, monkeypatch):
  """The first step of a run is mostly compilation: the ETA uses the pace of the steps after it."""
  clock = [1000.0]
  monkeypatch.setattr(log_lib.time, "monotonic", lambda: clock[0])
  config = tiny.get_config()
  logger = MetricLogger(tmp_path, config, total_steps=10)
  clock[0] += 100.0  # step 1: compile + run
  logger.step_done(1)
  assert logger.eta_seconds(1) is None
  for step in range(2, 6):  # then 1 s per step
    clock[0] += 1.0
    logger.step_done(step)
  assert logger.eta_seconds(5) == 5.0  # 5 steps left at 1 s each (counting step 1 would say ~104 s)
  logger.progress(5, {"loss": 0.5})
  assert "eta 0:00:05" in capsys.readouterr().out
  logger.close()


def test_resume_drops_rows_after_the_restored_step(tmp_path):
  """A run killed after its checkpoint at step 4 logged steps 5-6; resumed at 4, they are logged again."""
  config = tiny.get_config()
  rows = [{"step": 0, "val/loss_t100": 1.0}] + [{"step": s, "train/loss": float(s)} for s in range(1, 7)]
  text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "train/lo'  # cut short by the kill
  (tmp_path / "metrics.jsonl").write_text(text)
  logger = MetricLogger(tmp_path, config, total_steps=10, start_step=4)
  logger.log(5, {"loss": 5.5})
  logger.close()
  steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert steps == [0, 1, 2, 3, 4, 5]
  # A fresh start (no checkpoint) begins a new file: step 0's validation is logged again.
  MetricLogger(tmp_path, config, total_steps=10, start_step=0).close()
  assert (tmp_path / "metrics.jsonl").read_text() == ""

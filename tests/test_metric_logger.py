"""MetricLogger: JSONL always, offline wandb without an account, a progress line with a bar and ETA."""

import json

from configs import tiny
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

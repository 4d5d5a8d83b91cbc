"""The trainer's start-up, before any model is built: the data is checked first, a user's dataset
folder is read and never written, and a failed start leaves the job's ``config.json`` as it was."""

from __future__ import annotations

import pytest

from configs import tiny
from conftest import file_snapshot, make_users_dataset
from v2w_jax.data.dataset import DataError
from v2w_jax.training import trainer


@pytest.fixture
def config(tmp_path, monkeypatch):
  monkeypatch.setenv("V2W_OUTPUT_ROOT", str(tmp_path / "out"))
  c = tiny.get_config()
  c.data.sample_dataset_dir = str(tmp_path / "sample")
  return c


@pytest.fixture(autouse=True)
def model_must_not_be_built(monkeypatch):
  def build_model(*args, **kwargs):
    raise AssertionError("the model was built before the data was checked")

  monkeypatch.setattr(trainer, "build_model", build_model)


def test_missing_dataset_folder_is_an_error_naming_the_field(config, tmp_path):
  config.data.dataset_dir = str(tmp_path / "datsets" / "mine")  # a typo: nothing may be created there
  with pytest.raises(DataError, match=r"data\.dataset_dir=.*datsets/mine: the dataset folder does not exist"):
    trainer.train(config)
  assert not (tmp_path / "datsets").exists()


def test_users_folder_is_checked_and_never_written(config, tmp_path):
  users = make_users_dataset(tmp_path / "mine")
  before = file_snapshot(users)
  config.data.dataset_dir = config.data.val_dataset_dir = str(users)  # tiny config: make_sample_dataset=True
  with pytest.raises(DataError, match=r"mine/videos/sample_0000\.mp4"):  # their clip is no video: named
    trainer.train(config)
  assert file_snapshot(users) == before


def test_failed_start_keeps_the_jobs_config_json(config, tmp_path):
  job = trainer.job_dir(config)
  job.mkdir(parents=True)
  (job / "config.json").write_text('{"the": "settings of the saved checkpoints"}')
  config.data.dataset_dir = str(tmp_path / "missing")
  with pytest.raises(DataError):
    trainer.train(config)
  assert (job / "config.json").read_text() == '{"the": "settings of the saved checkpoints"}'

"""Small trainer pieces: the out-of-memory hint and the job folder."""

from configs import tiny
from v2w_jax.training import trainer


def test_oom_hint_names_the_settings_to_change():
  err = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 80.00GiB")
  hint = trainer.oom_hint(err)
  assert isinstance(hint, MemoryError)
  for setting in ("remat_policy=full", "mesh.fsdp", "mesh.context", "reference_bf16", "num_frames"):
    assert setting in str(hint)
  assert trainer.oom_hint(ValueError("shapes do not match")) is None


def test_job_dir_follows_config_and_env(monkeypatch, tmp_path):
  config = tiny.get_config()
  monkeypatch.delenv("V2W_OUTPUT_ROOT", raising=False)
  assert trainer.job_dir(config).parts[-4:] == ("outputs", "cosmos_predict_v2p5", "video2world", "tiny")
  monkeypatch.setenv("V2W_OUTPUT_ROOT", str(tmp_path))
  assert trainer.job_dir(config) == tmp_path / "cosmos_predict_v2p5" / "video2world" / "tiny"

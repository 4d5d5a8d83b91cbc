"""tools/convert_torch_ckpt.py as a user runs it: exporting a training run, sizes read from the file,
and one ``error:`` line for each mistake."""

from __future__ import annotations

import json
import os
import stat

import jax
import numpy as np
import optax
import pytest

from configs import tiny
from tools import convert_torch_ckpt as cli
from v2w_jax.convert import dit as convert_dit
from v2w_jax.convert import load as load_lib
from v2w_jax.convert import torch_pt
from v2w_jax.inference import weights as W
from v2w_jax.models.dit_config import DiTConfig


def _run_error(capsys, *argv: str) -> str:
  """Runs the CLI expecting a user error: exit status 2 and one ``error:`` message on stderr."""
  assert cli.main(list(argv)) == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err
  lines = [l for l in err.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, err
  return err[err.index("error: "):]


def _torch_tree(path) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in torch_pt.load(path).items()}


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
  """A tiny training job folder with steps 10 and 20; EMA and regular weights differ at each step."""
  from v2w_jax.training.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  from v2w_jax.training.state import init_train_state  # pylint: disable=import-outside-toplevel

  config = tiny.get_config()
  cfg = DiTConfig.from_config(config.model)
  job = tmp_path_factory.mktemp("run") / "job"
  meta = {"config": json.loads(config.to_json_best_effort())}
  trees = {}
  ck = Checkpointer(job / "checkpoints", keep=3, async_save=False)
  for step in (10, 20):
    regular = W.random_dit_params(cfg, seed=step)
    ema = jax.tree.map(lambda x, s=step: np.asarray(x) * 0.5 + s, regular)
    ck.save(step, init_train_state(regular, optax.adamw(1e-3)).replace(ema_params=ema), None, dict(meta, step=step))
    trees[step] = {"regular": regular, "ema": ema}
  ck.close()
  return job, cfg, trees


def _expected(cfg, params) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in convert_dit.params_to_torch(params, cfg, dtype=np.float32).items()}


def _assert_same(got: dict, want: dict) -> None:
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_export_a_training_run(train_run, tmp_path):
  job, cfg, trees = train_run
  out = tmp_path / "latest.pt"
  old_umask = os.umask(0o022)
  try:
    cli.main(["--direction", "to_torch", "--input", str(job / "checkpoints"), "--output", str(out),
              "--dtype", "float32"])
  finally:
    os.umask(old_umask)
  _assert_same(_torch_tree(out), _expected(cfg, trees[20]["ema"]))  # latest step, EMA weights by default
  assert stat.S_IMODE(out.stat().st_mode) == 0o644  # not mkstemp's 0600
  step10 = tmp_path / "step10_regular.pt"
  cli.main(["--input", str(job / "checkpoints" / "10"), "--output", str(step10), "--dtype", "float32",
            "--weights", "regular"])  # a folder input: to_torch is the default direction
  _assert_same(_torch_tree(step10), _expected(cfg, trees[10]["regular"]))
  # The export loads back as a reference checkpoint of the same model.
  back = W.load_dit_params(out, cfg)
  np.testing.assert_array_equal(back["x_embedder"]["proj"]["kernel"], trees[20]["ema"]["x_embedder"]["proj"]["kernel"])


def test_export_errors(train_run, tmp_path, capsys):
  job, _, _ = train_run
  out = tmp_path / "x.pt"
  out.write_bytes(b"keep me")
  msg = _run_error(capsys, "--input", str(job), "--output", str(out))
  assert "--overwrite" in msg and out.read_bytes() == b"keep me"
  msg = _run_error(capsys, "--input", str(job), "--output", str(tmp_path / "v.pt"), "--kind", "vae")
  assert "DiT weights only" in msg
  msg = _run_error(capsys, "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "y.pt"))
  assert "no such file or folder" in msg


def test_truncated_pt_is_named_truncated(fixtures_dir, tmp_path, capsys):
  data = (fixtures_dir / "dit_tiny" / "model_ema_fp32.pt").read_bytes()
  cut = tmp_path / "cut.pt"
  cut.write_bytes(data[: len(data) // 3])
  msg = _run_error(capsys, "--input", str(cut), "--output", str(tmp_path / "o"))
  assert "truncated or corrupt" in msg and str(cut) in msg and "not a torch.save zip" not in msg
  (tmp_path / "empty.pt").write_bytes(b"")
  assert "empty" in _run_error(capsys, "--input", str(tmp_path / "empty.pt"), "--output", str(tmp_path / "o"))


def test_wrong_kind_says_which_kind(fixtures_dir, tmp_path, capsys):
  vae, dit = fixtures_dir / "wan_vae_tiny" / "weights.pt", fixtures_dir / "dit_tiny" / "model_ema_fp32.pt"
  msg = _run_error(capsys, "--kind", "dit", "--input", str(vae), "--output", str(tmp_path / "o"))
  assert "this looks like a VAE checkpoint: use --kind vae" in msg and len(msg.splitlines()) == 1
  msg = _run_error(capsys, "--kind", "vae", "--input", str(dit), "--output", str(tmp_path / "o"))
  assert "this looks like a DiT checkpoint: use --kind dit" in msg and len(msg.splitlines()) == 1
  # The trainer's and generator's loader say it too.
  with pytest.raises(load_lib.WeightsError, match="looks like a VAE checkpoint"):
    W.load_dit_params(vae, DiTConfig.from_config(tiny.get_config().model))


def test_sizes_come_from_the_file_without_config(fixtures_dir, tmp_path, capsys):
  folder = fixtures_dir / "dit_tiny"
  net = json.loads((folder / "config.json").read_text())["net"]
  orbax_dir = tmp_path / "dit"
  cli.main(["--input", str(folder / "model_ema_fp32.pt"), "--output", str(orbax_dir)])  # no --config
  stored = json.loads(json.dumps(load_lib.params_io.load_metadata(orbax_dir)["config"]))
  for field in ("model_channels", "num_heads", "num_blocks", "adaln_lora_dim", "crossattn_emb_channels",
                "crossattn_proj_in_channels"):
    assert stored[field] == net[field], field
  # ... and back, again without --config (the folder remembers its config): the fixture's tensors.
  back = tmp_path / "back.pt"
  cli.main(["--input", str(orbax_dir), "--output", str(back), "--dtype", "float32"])
  want = _torch_tree(folder / "model_ema_fp32.pt")
  got = _torch_tree(back)
  for key in want:
    if not key.endswith("_extra_state") and ".accum_" not in key:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  # A config that does not describe the file: a short message that names --config.
  msg = _run_error(capsys, "--input", str(folder / "model_ema_fp32.pt"), "--output", str(tmp_path / "o"),
                   "--config", "configs/tiny.py")
  assert "--config configs/tiny.py" in msg and len(msg.splitlines()) <= 16
  # The VAE: its base width comes from the file too (the released model is 96 wide, the fixture 8).
  cli.main(["--input", str(fixtures_dir / "wan_vae_tiny" / "weights.pt"), "--output", str(tmp_path / "vae")])
  assert load_lib.params_io.load_metadata(tmp_path / "vae")["config"]["base_dim"] == 8


def test_shapes_the_port_cannot_read_ask_for_config(fixtures_dir, tmp_path, capsys):
  state = _torch_tree(fixtures_dir / "dit_tiny" / "model_ema_fp32.pt")
  state["net.x_embedder.proj.1.weight"] = np.zeros((128, 40), np.float32)  # another patch / channel layout
  odd = tmp_path / "odd.pt"
  torch_pt.save(odd, state)
  msg = _run_error(capsys, "--input", str(odd), "--output", str(tmp_path / "o"))
  assert "model_channels=128" in msg and "--config" in msg and "x_embedder" in msg
  assert len(msg.splitlines()) <= 16

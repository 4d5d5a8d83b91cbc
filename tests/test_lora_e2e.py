"""LoRA post-training end to end on CPU: the tiny config with ``--config.lora.rank=4``.

One LoRA run from a base params folder (validation at steps 0 and 12) is shared by the tests:

(a) the validation loss falls, the checkpoint holds only adapters (plus the base fingerprint), and a
    run killed with SIGKILL and restarted with the same command ends bitwise equal to it;
(b) exports through ``tools/convert_torch_ckpt.py``: the merged model differs from the base exactly
    by (alpha/r)·B·A on the adapted layers (nothing else changed), the adapters ``.pt`` imports back
    bit for bit, and generation blends them from either source into the same weights.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from test_train_e2e import _command, _env, _final_params, _job, _metrics, _run, dataset  # noqa: F401 (fixture)
from conftest import REPO_ROOT, kill_after_checkpoint
from configs import tiny
from v2w_jax.convert import dit as convert_dit
from v2w_jax.convert import lora as convert_lora
from v2w_jax.convert import lora_load, params_io, torch_pt
from v2w_jax.convert.tree import flatten
from v2w_jax.inference import lora as inference_lora
from v2w_jax.inference.weights import random_params_like
from v2w_jax.models import dit, lora
from v2w_jax.training import trainer

pytestmark = pytest.mark.slow

RANK, ALPHA = 4, 8.0
ARGS = (f"--config.lora.rank={RANK}", f"--config.lora.alpha={ALPHA}", "--config.trainer.max_iter=12",
        "--config.trainer.save_iter=4", "--config.trainer.validation_iter=12", "--config.trainer.logging_iter=1")


@pytest.fixture(scope="module")
def base_cfg():
  return trainer.dit_config(tiny.get_config())


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory, base_cfg):
  folder = tmp_path_factory.mktemp("base") / "dit_params"
  params_io.save_params(folder, random_params_like(dit.abstract_params(base_cfg), seed=11))
  return folder


@pytest.fixture(scope="module")
def lora_run(dataset, base_folder, tmp_path_factory):  # noqa: F811 (fixture)
  out = tmp_path_factory.mktemp("lora_ref")
  cmd = _command(dataset, *ARGS, f"--config.checkpoint.load_path={base_folder}")
  _run(cmd, _env(out, 1))
  return cmd, out


def _losses(out):
  return {m["step"]: m["train/loss"] for m in _metrics(out) if "train/loss" in m}


def test_lora_run_trains_adapters_only_and_resumes_bitwise_after_sigkill(lora_run, tmp_path):
  cmd, ref = lora_run
  val = [m for m in _metrics(ref) if any(k.startswith("val/") for k in m)]
  assert [m["step"] for m in val] == [0, 12]
  before, after = (np.mean([v for k, v in m.items() if k.startswith("val/")]) for m in val)
  assert after < 0.9 * before, (before, after)

  saved = _final_params(ref, 12)
  assert saved and all(k.split("/")[-1] in lora.ADAPTER_LEAVES for k in saved if k.startswith(("/params", "/ema")))
  meta = lora_load.lora_train_meta(_job(ref) / "checkpoints")
  assert meta["rank"] == RANK and meta["alpha"] == ALPHA and len(meta["base_fingerprint"]) == 64

  killed = tmp_path / "killed"
  kill_after_checkpoint(cmd, _env(killed, 1), _job(killed) / "checkpoints" / "4" / "commit_success.txt")
  assert max(_losses(killed)) < 12, "the kill came too late to test a restart"
  _run(cmd, _env(killed, 1))  # the same command resumes (the base is loaded again and checked)
  resumed = _final_params(killed, 12)
  assert resumed.keys() == saved.keys()
  for k in saved:
    np.testing.assert_array_equal(resumed[k], saved[k], err_msg=k)
  ref_losses, got = _losses(ref), _losses(killed)
  assert all(got[s] == ref_losses[s] for s in range(9, 13))


def _convert(*args):
  proc = subprocess.run([sys.executable, "tools/convert_torch_ckpt.py", "--config=configs/tiny.py", *map(str, args)],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_export_merged_and_adapters_then_import_and_generate(lora_run, base_folder, base_cfg, tmp_path):
  _, ref = lora_run
  checkpoints = _job(ref) / "checkpoints"
  _convert("--lora=adapters", f"--input={checkpoints}", f"--output={tmp_path / 'adapters.pt'}")
  _convert("--lora=merged", f"--input={checkpoints}", f"--output={tmp_path / 'merged.pt'}", "--dtype=float32")
  sidecar = json.loads((tmp_path / "adapters.pt.json").read_text())
  assert sidecar["r"] == RANK and sidecar["lora_alpha"] == ALPHA and sidecar["base_path"] == str(base_folder)

  # Import: the adapters file holds exactly the run's EMA adapters.
  ema = {k.split("/", 2)[2]: v for k, v in _final_params(ref, 12).items() if k.startswith("/ema_params/")}
  imported = lora_load.read_adapters(tmp_path / "adapters.pt", base_cfg)
  flat = {"/".join(p): v for p, v in flatten(imported.tree).items()}
  assert flat.keys() == ema.keys()
  for k in ema:
    np.testing.assert_array_equal(flat[k], ema[k], err_msg=k)

  # Merged = base + (alpha/r)·B·A on the adapted layers, the base itself everywhere else.
  base = convert_dit.params_to_torch(params_io.load_params(base_folder), base_cfg, dtype=np.float32)
  adapters = torch_pt.load(tmp_path / "adapters.pt")
  merged = torch_pt.load(tmp_path / "merged.pt")
  assert set(merged) == set(base)
  changed = 0
  for key, w in base.items():
    a_key = key[: -len(".weight")] + ".lora_A.default.weight"
    w = np.asarray(w)
    if a_key in adapters:
      want = convert_lora.merge_torch_weight(w, adapters[a_key], adapters[a_key.replace("lora_A", "lora_B")],
                                             ALPHA / RANK)
      changed += 1
    else:
      want = w.astype(np.float32) if w.dtype.kind == "f" else w
    np.testing.assert_array_equal(np.asarray(merged[key]), want, err_msg=key)
  assert changed == 10 * base_cfg.num_blocks

  # A reference LoRA net's .pt built from them converts to a params folder holding both.
  state = {(k[: -len(".weight")] + ".base_layer.weight" if k[: -len(".weight")] + ".lora_A.default.weight" in adapters
            else k): np.asarray(v) for k, v in base.items()}
  state.update({k: np.asarray(v) for k, v in adapters.items()})
  torch_pt.save(tmp_path / "reference_lora.pt", state)
  _convert(f"--input={tmp_path / 'reference_lora.pt'}", f"--output={tmp_path / 'imported'}", f"--lora_alpha={ALPHA}")
  folder = params_io.load_params(tmp_path / "imported")
  _, folder_adapters = lora.split_params(folder)
  for x, y in zip(jax.tree.leaves(folder_adapters), jax.tree.leaves(imported.tree)):
    np.testing.assert_array_equal(x, y)

  # Generation: the run's checkpoint and the exported file give the same merged weights.
  from_run, _ = inference_lora.load_dit_params(str(base_folder), base_cfg,
                                               inference_lora.parse_lora_flag(f"{checkpoints}:0.5"))
  from_file, records = inference_lora.load_dit_params(
      str(base_folder), base_cfg, inference_lora.parse_lora_flag(f"{tmp_path / 'adapters.pt'}:0.5"))
  assert records[0]["alpha"] == ALPHA and records[0]["rank"] == RANK
  for x, y in zip(jax.tree.leaves(from_run), jax.tree.leaves(from_file)):
    np.testing.assert_array_equal(x, y)

"""Memory known before the first step: the compiled step's per-device memory, the dry run, the fit check.

The two end-to-end tests run the trainer's CLI on the tiny config with a dataset folder that does not
exist: reading any data would fail with a dataset error, so passing proves the memory report and the
fit check come first.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from configs import nemo, tiny
from v2w_jax.parallel import mesh as mesh_lib
from v2w_jax.training import memory as memory_lib

GIB = 2**30


def _cli(repo_root, tmp_path, *overrides):
  env = dict(os.environ, V2W_OUTPUT_ROOT=str(tmp_path / "out"), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  cmd = [sys.executable, "-m", "v2w_jax.train", "--config=configs/tiny.py",
         f"--config.data.dataset_dir={tmp_path / 'no_such_dataset'}", "--config.data.make_sample_dataset=False",
         "--config.wandb.mode=disabled", *overrides]
  return subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)


_SIZE = r"([\d.]+ [MG]iB)"
_REPORT = re.compile(rf"train step memory per device \(compiled\): state {_SIZE}, batch {_SIZE}, "
                     rf"temporaries {_SIZE}, peak {_SIZE}")


def _bytes(text: str) -> float:
  value, unit = text.split()
  return float(value) * (GIB if unit == "GiB" else 2**20)


def test_dry_run_prints_the_step_memory_and_reads_no_data(repo_root, tmp_path):
  proc = _cli(repo_root, tmp_path, "--config.trainer.dry_run=True")
  assert proc.returncode == 0, proc.stderr[-3000:]
  m = _REPORT.search(proc.stdout)
  assert m, proc.stdout
  state, _, temporaries, peak = (_bytes(x) for x in m.groups())
  # The tiny model's fp32 state (params, two Adam moments, EMA) is a few MiB; the peak includes it.
  assert 0 < state < 100 * 2**20 and temporaries > 0 and peak >= state
  job = tmp_path / "out" / "cosmos_predict_v2p5" / "video2world" / "tiny"
  assert not (job / "checkpoints").exists() and not (job / "config.json").exists()


def test_a_step_too_big_for_the_device_fails_at_start_with_one_error_line(repo_root, tmp_path):
  proc = _cli(repo_root, tmp_path, "--config.trainer.memory_limit_gib=0.001")
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]  # a settings mistake
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, proc.stderr[-3000:]
  line = errors[0]
  assert "does not fit the device" in line and "has 1.0 MiB" in line
  for setting in ("--config.ema.offload=True", "--config.optim.precision=reference_bf16",
                  "--config.model.remat_policy=full", "--config.mesh.fsdp", "--config.mesh.context"):
    assert setting in line
  assert "dataset" not in proc.stderr.lower()  # stopped before the data


def _fake_memory(peak_gib: float) -> memory_lib.StepMemory:
  prog = memory_lib.ProgramMemory(name="step", arguments=int(30 * GIB), outputs=int(30 * GIB),
                                  aliased=int(30 * GIB), temporaries=int((peak_gib - 30) * GIB))
  return memory_lib.StepMemory(state=int(30 * GIB), state_host=0, programs=(prog,))


def test_fit_check_suggests_only_settings_not_already_used():
  config = nemo.get_config()
  mem = _fake_memory(85.0)
  assert mem.peak == pytest.approx(85 * GIB, rel=1e-6)
  memory_lib.check_fits(mem, int(90 * GIB), 0, config)  # fits
  memory_lib.check_fits(mem, None, 0, config)  # unknown limit (CPU): no check
  with pytest.raises(MemoryError, match="needs 85.0 GiB.*has 80.0 GiB, 6.0 GiB already in use"):
    memory_lib.check_fits(mem, int(80 * GIB), int(6 * GIB), config)
  config.ema.offload = True
  config.optim.precision = "reference_bf16"
  config.model.remat_policy = "full"
  with pytest.raises(MemoryError) as err:
    memory_lib.check_fits(mem, int(80 * GIB), 0, config)
  assert "ema.offload" not in str(err.value) and "remat_policy" not in str(err.value)
  assert "reference_bf16" not in str(err.value) and "mesh.fsdp" in str(err.value)


def test_budget_override_and_per_device_bytes():
  trainer_cfg = tiny.get_config().trainer
  trainer_cfg.memory_limit_gib = 80.0
  assert memory_lib.device_budget(trainer_cfg)[0] == 80 * GIB
  trainer_cfg.memory_limit_gib = 0.0
  assert memory_lib.device_budget(trainer_cfg)[0] == (
      (jax.devices()[0].memory_stats() or {}).get("bytes_limit"))
  mesh = mesh_lib.make_mesh(dict(data=1, fsdp=1, context=1))
  dev = NamedSharding(mesh, PartitionSpec())
  tree = {"w": jax.ShapeDtypeStruct((4, 8), jnp.float32, sharding=dev),
          "e": jax.ShapeDtypeStruct((4, 8), jnp.float32, sharding=dev.with_memory_kind("pinned_host")),
          "b": jax.ShapeDtypeStruct((3,), jnp.bfloat16, sharding=dev)}
  assert memory_lib.per_device_bytes(tree) == (4 * 8 * 4 + 3 * 2, 4 * 8 * 4)


def test_abstract_batch_matches_the_configured_clip():
  config = nemo.get_config()
  from v2w_jax.training import trainer  # pylint: disable=import-outside-toplevel

  mesh = mesh_lib.make_mesh(dict(data=1, fsdp=1, context=1))
  batch = memory_lib.abstract_batch(config, mesh, trainer.dit_config(config))
  assert batch["latents"].shape == (1, 16, 24, 88, 160) and batch["latents"].dtype == jnp.float32
  assert batch["text_embeddings"].shape == (1, 512, 100352) and batch["text_embeddings"].dtype == jnp.bfloat16
  assert batch["padding_mask"].shape == (1, 1, 704, 1280)

"""CPU checks of the benchmark scripts' logic (their GPU numbers live in docs/performance.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import perf_suite, profile_summary


def _gpu_like_trace():
  meta = [
      {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
      {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "pid": 2, "tid": 7, "name": "thread_name", "args": {"name": "Stream #13(Compute)"}},
      {"ph": "M", "pid": 2, "tid": 8, "name": "thread_name", "args": {"name": "XLA Ops"}},
  ]
  kernels = [
      ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7", 100.0),
      ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_3", 300.0),
      ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT", 50.0),
      ("loop_multiply_fusion_3", 20.0),
      ("loop_multiply_fusion_3", 20.0),
      ("ncclDevKernel_AllGather_RING_LL", 5.0),
  ]
  events = [{"ph": "X", "pid": 2, "tid": 7, "ts": 10.0 * i, "dur": 1e3 * ms, "name": name}
            for i, (name, ms) in enumerate(kernels)]
  # The same work seen again on a derived timeline and on the host must not be counted.
  events += [{"ph": "X", "pid": 2, "tid": 8, "ts": 0.0, "dur": 1e6, "name": "fusion.1", "args": {"hlo_op": "x"}},
             {"ph": "X", "pid": 1, "tid": 1, "ts": 0.0, "dur": 1e6, "name": "PjitFunction(step)"}]
  return {"traceEvents": meta + events}


def test_summary_counts_only_device_stream_kernels_by_category():
  s = profile_summary.summarize(_gpu_like_trace())
  assert s["sources"] == ["Stream #13(Compute)"]
  assert s["kernels"] == 6
  assert s["busy_ms"] == pytest.approx(495.0)
  assert s["by_category_ms"] == pytest.approx({"attention_backward": 300.0, "attention_forward": 100.0,
                                               "matmul": 50.0, "other_fusions": 40.0, "collective": 5.0})
  top = s["top_kernels"]
  assert top[0]["category"] == "attention_backward" and top[0]["ms"] == pytest.approx(300.0)
  fusion = next(k for k in top if k["name"] == "loop_multiply_fusion_3")
  assert fusion["calls"] == 2 and fusion["ms"] == pytest.approx(40.0)


def test_train_step_benchmark_on_a_cpu_mesh_with_profile(tmp_path, repo_root):
  """The benchmark's mesh flags and profiler path run end to end (2 clips over fsdp 2, context 2)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  out = tmp_path / "r.json"
  subprocess.run([sys.executable, "-m", "benchmarks.train_step", "--tiny", "--fsdp=2", "--context=2", "--steps=1",
                  f"--profile={tmp_path / 'prof'}", f"--json={out}"], cwd=repo_root, env=env, check=True,
                 capture_output=True, timeout=600)
  r = json.loads(out.read_text())["result"]
  assert r["mesh"] == {"data": 1, "fsdp": 2, "context": 2}
  assert r["clips_per_step"] == 2
  assert r["seconds_per_clip"] == pytest.approx(r["median_s"] / 2)
  assert r["loss"] == r["loss"] and r["loss"] > 0  # finite, positive
  assert r["profile"]["kernels"] > 0 and r["profile"]["by_category_ms"]


def test_train_step_benchmark_lora_on_a_cpu_mesh(tmp_path, repo_root):
  """--lora: only adapters train (float32) beside a frozen bf16 base, sharded like their layers."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  out = tmp_path / "r.json"
  subprocess.run([sys.executable, "-m", "benchmarks.train_step", "--tiny", "--lora", "--fsdp=2", "--context=2",
                  "--steps=1", f"--json={out}"], cwd=repo_root, env=env, check=True, capture_output=True, timeout=600)
  r = json.loads(out.read_text())["result"]
  lora = r["lora"]
  assert (lora["rank"], lora["alpha"]) == (32, 32.0)
  assert lora["trainable_dtype"] == "float32" and lora["frozen_dtype"] == "bfloat16"
  assert 0 < lora["trainable_params"] < lora["frozen_params"]
  assert lora["shardings"] == {"mlp.layer1.kernel": [None, "fsdp", None],
                               "mlp.layer1.lora_a": [None, "fsdp", None], "mlp.layer1.lora_b": [None, None, None]}
  assert r["loss"] == r["loss"] and r["loss"] > 0


def _reshard(repo_root, mode, folder, devices, *mesh_flags):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "benchmarks.checkpoint_reshard", mode, f"--dir={folder}", "--tiny",
                         *mesh_flags], cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)


def test_checkpoint_saved_on_4_devices_restores_on_2_and_a_changed_state_is_caught(tmp_path, repo_root):
  folder = tmp_path / "ck"
  saved = _reshard(repo_root, "save", folder, 4, "--fsdp=4")
  assert saved.returncode == 0, saved.stderr[-2000:]
  restored = _reshard(repo_root, "restore", folder, 2, "--fsdp=1", "--context=2")
  assert restored.returncode == 0, restored.stderr[-2000:]
  r = json.loads(restored.stdout.strip().splitlines()[-1])["result"]
  assert r["saved_on"]["fsdp"] == 4 and r["devices"] == 2 and r["equal"]
  # A fingerprint that no longer matches the checkpoint must fail the check, naming the leaf.
  prints = json.loads((folder / "fingerprint.json").read_text())
  prints[3]["values"][0] += 1.0
  (folder / "fingerprint.json").write_text(json.dumps(prints))
  bad = _reshard(repo_root, "restore", folder, 2, "--fsdp=2")
  assert bad.returncode != 0
  assert prints[3]["leaf"] in json.loads(bad.stdout.strip().splitlines()[-1])["result"]["mismatched_leaves"]


def test_latent_cache_benchmark_summarizes_iterations_after_the_first():
  from benchmarks import latent_cache as bench  # pylint: disable=import-outside-toplevel

  rows = [{"time": t, "train/loss": 1.0, "train/data_wait_s": w, "train/vae_s": v, "train/step_s": s}
          for t, w, v, s in ((0.0, 5.0, 9.0, 30.0), (10.0, 0.1, 1.0, 8.0), (21.0, 0.3, 1.2, 9.0), (33.0, 0.2, 1.1, 10.0))]
  r = bench.summarize_iterations(rows)
  assert r["iterations"] == 4 and r["loop_s"] == pytest.approx(11.0)  # median of 10, 11, 12
  assert (r["data_wait_s"], r["vae_s"], r["step_s"]) == pytest.approx((0.2, 1.1, 9.0))  # the first row left out
  assert r["iter_s"] == pytest.approx(10.5)  # median of 9.1, 10.5, 11.3
  assert r["iter_over_step"] == pytest.approx(10.5 / 9.0)
  with pytest.raises(ValueError):
    bench.summarize_iterations(rows[:1])


@pytest.mark.slow
def test_latent_cache_benchmark_dry_run_on_cpu(tmp_path, repo_root):
  """Every stage of the GPU command with the tiny config: dataset, cache build, trainer without and with it."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = tmp_path / "r.json"
  proc = subprocess.run([sys.executable, "-m", "benchmarks.latent_cache", "--tiny", f"--workdir={tmp_path / 'w'}",
                         f"--json={out}"], cwd=repo_root, env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  r = json.loads(out.read_text())
  b = r["build"]
  assert (b["encoded_clips"], b["encoded_windows"], b["devices"], b["failed"]) == (3, 6, 1, {})
  assert b["windows_per_s"] > 0 and b["clips_per_s_per_device"] == pytest.approx(b["windows_per_s"] / 2)
  for name in ("online", "cached"):
    run = r[name]
    assert run["iterations"] == 3 and all(loss == loss for loss in run["loss"])
    assert run["iter_over_step"] == pytest.approx(run["iter_s"] / run["step_s"])
  assert "trainer cached" in proc.stdout and "clips/s per device" in proc.stdout


def test_perf_suite_plans_fit_the_budget_and_name_real_variants():
  for plan, names in perf_suite.PLANS.items():
    assert all(n in perf_suite.VARIANTS for n in names), plan
  # The default plan fits one 9-minute command with a minute to spare.
  assert sum(perf_suite.VARIANTS[n].expected_s for n in perf_suite.PLANS["default"]) <= 530 - 60
  for v in perf_suite.VARIANTS.values():
    assert v.fallback is None or v.fallback in perf_suite.VARIANTS
  assert perf_suite.expand_plan("default,ts_720p_fp32,mr_720p_bf16") == [*perf_suite.PLANS["default"], "mr_720p_bf16"]


def test_perf_suite_tiny_plan_runs_the_step_and_the_memory_report(tmp_path, repo_root):
  """The driver end to end on CPU: the tiny step (EMA in host memory) is timed, and the memory report
  gives the residuals, the compiled memory and XLA's buffers at the peak."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = tmp_path / "suite"
  proc = subprocess.run([sys.executable, "-m", "benchmarks.perf_suite", "--plan=tiny", f"--out={out}", "--budget_s=900"],
                        cwd=repo_root, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  rows = {r["name"]: r for r in json.loads((out / "summary.json").read_text())["variants"]}
  assert rows["tiny_step"]["status"] == "ok", rows["tiny_step"]
  assert rows["tiny_step"]["median_s"] > 0 and rows["tiny_step"]["state_host_gib"] > 0  # the EMA is on the host
  assert rows["tiny_step"]["attention_kernel"] == "xla" and rows["tiny_step"]["loss"] > 0
  assert rows["tiny_memory"]["status"] == "ok", rows["tiny_memory"]
  report = json.loads((out / "tiny_memory.json").read_text())["result"]
  assert report["compiled"]["peak_gib"] >= report["compiled"]["state_gib"] > 0
  res = report["residuals"]
  assert res["stacked_over_blocks_gib"] > 0 and res["total_gib"] >= res["stacked_over_blocks_gib"]
  buffers = report["buffers"]["step"]
  assert buffers["source"] == "live at the peak" and buffers["rows"], buffers
  assert buffers["by_kind_gib"].get("train state", 0) > 0
  assert any(r["op_name"] for r in buffers["rows"])  # buffers are named by their JAX op

"""Parity tests hold for any fixtures folder of the same layout, whatever its cases are called.

``tests/tools/rename_fixture_cases.py`` writes a copy of the fixtures folder with every sampler run and
VAE case renamed, the first sampler run duplicated and a text-embedding pad length dropped; the sampler
parity tests then run on that copy, unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import run_arrays, sampler_runs

TOOL = "tests/tools/rename_fixture_cases.py"


@pytest.fixture(scope="module")
def renamed(fixtures_dir, repo_root, tmp_path_factory):
  """(copy folder, the tool's report) for a copy of the fixtures folder."""
  dst = tmp_path_factory.mktemp("fixtures") / "renamed"
  out = subprocess.run([sys.executable, TOOL, str(fixtures_dir), str(dst)], cwd=repo_root, capture_output=True,
                       text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr
  return dst, json.loads(out.stdout)


def test_copy_renames_every_sampler_run_and_keeps_its_arrays(fixtures_dir, renamed):
  dst, report = renamed
  mapping = {old: new for old, new in report["samplers"].items() if "(copy" not in old}
  metrics_old = json.loads((fixtures_dir / "samplers" / "metrics.json").read_text())
  metrics_new = json.loads((dst / "samplers" / "metrics.json").read_text())
  for name, section in (("rf_unipc.npz", "rf_unipc"), ("edm_sampler.npz", "edm_sampler")):
    with np.load(fixtures_dir / "samplers" / name) as a, np.load(dst / "samplers" / name) as b:
      old, new = dict(a), dict(b)
    runs_old, runs_new = sampler_runs(old), sampler_runs(new)
    assert not set(runs_old) & set(runs_new) and len(runs_new) == len(runs_old) + 1
    for run in runs_old:
      before, after = run_arrays(old, run), run_arrays(new, mapping[run])
      assert set(after) <= set(before)
      for field, value in after.items():
        np.testing.assert_array_equal(value, before[field], err_msg=f"{name} {run}_{field}")
      assert metrics_new[section][mapping[run]] == metrics_old[section][run]
    shared = [k for k in old if k.startswith(("toy_", "table_")) or k == "gauss_analytic"]
    assert shared and all(np.array_equal(new[k], old[k]) for k in shared)


@pytest.mark.slow
def test_sampler_parity_tests_pass_on_the_renamed_copy(renamed, repo_root, reference_file):
  dst, report = renamed
  env = dict(os.environ, V2W_FIXTURES=str(dst), V2W_REFERENCE=str(reference_file("dit_spec.md").parent))
  files = ["tests/test_samplers_unipc.py", "tests/test_samplers_edm.py", "tests/test_guidance.py"]
  out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-q", "-p", "no:cacheprovider",
                        "--collect-only", *files], cwd=repo_root, env=env, capture_output=True, text=True,
                       timeout=600, check=False)
  assert out.returncode == 0, out.stdout[-3000:]
  copies = [new for old, new in report["samplers"].items() if "(copy" in old]
  assert copies and all(f"[{c}]" in out.stdout or f"-{c}]" in out.stdout for c in copies)  # runs discovered
  out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-q", "-p", "no:cacheprovider", *files],
                       cwd=repo_root, env=env, capture_output=True, text=True, timeout=1200, check=False)
  assert out.returncode == 0, out.stdout[-3000:]

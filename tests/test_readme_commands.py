"""The README's quick-start commands install CPU-only wheels, and CI runs its test command verbatim.

The train command installs no torch (training never imports it: the SIGTERM end-to-end test runs
the trainer with torch made unimportable); the test command takes torch from PyTorch's CPU wheel
index, since ``torch==X`` from PyPI alone is the CUDA build with its nvidia-* packages.
"""

from __future__ import annotations

import re

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _quick_start_commands(repo_root) -> list[str]:
  readme = (repo_root / "README.md").read_text()
  section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
  return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def _pip_installs(command: str) -> list[str]:
  return [part.strip() for part in command.split("&&") if "pip install" in part]


def test_train_command_installs_no_torch(repo_root):
  train = _quick_start_commands(repo_root)[0]
  assert train.endswith("-m v2w_jax.train --config=configs/tiny.py"), train
  installs = _pip_installs(train)
  assert installs and not any("torch" in part for part in installs), installs
  core = (repo_root / "pyproject.toml").read_text().split("dependencies = [", 1)[1].split("]", 1)[0]
  assert "torch" not in core, "training's own dependencies must not pull torch"


def test_test_command_takes_torch_from_the_cpu_index_and_ci_runs_it(repo_root):
  test = _quick_start_commands(repo_root)[1]
  assert test.endswith("-m pytest -n 2 -q tests"), test
  torch_installs = [part for part in _pip_installs(test) if "torch" in part]
  assert torch_installs, test
  for part in torch_installs:
    assert re.search(rf"--(extra-)?index-url[ =]{re.escape(CPU_INDEX)}\b", part), part
  ci = (repo_root / ".ci" / "run").read_text().splitlines()
  assert test in ci, "CI must run the README's test command verbatim"

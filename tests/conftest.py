"""Shared pytest fixtures.

Golden fixtures come from ``$V2W_FIXTURES`` (default: ``../shared/fixtures`` next to the repository).
Parity tests read every size, head count and frame count from the fixture files themselves, so any
folder with the same layout must pass. Shared loaders: ``load_fixture_npz`` (golden ``.npz`` files),
``reference_file`` (the reference folder's key lists and anchors) and ``wan_vae_tiny`` (the VAE goldens).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import time
from typing import TYPE_CHECKING, Callable

import numpy as np
import pytest

if TYPE_CHECKING:
  from v2w_jax.models.vae import VAEConfig

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# One persistent XLA compilation cache for the whole run, shared by the in-process tests, the xdist
# workers and every trainer subprocess (they inherit the environment): the tiny programs are the same
# in many tests, and a cache hit cuts a trainer start from ~40 s to ~10 s on 2 cores. Keys include the
# program fingerprint, so a stale entry is never used. Set before any test imports jax.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO_ROOT / ".pytest_cache" / "jax_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


def make_users_dataset(root: pathlib.Path) -> pathlib.Path:
  """A user's own dataset folder: one clip and its caption (the bytes are not a real video)."""
  (root / "videos").mkdir(parents=True)
  (root / "metas").mkdir()
  (root / "videos" / "sample_0000.mp4").write_bytes(b"my own clip")
  (root / "metas" / "sample_0000.txt").write_text("my own caption")
  return root


def file_snapshot(root: pathlib.Path) -> dict[pathlib.Path, bytes]:
  """Every file under ``root`` with its bytes: equal snapshots = nothing written, added or removed."""
  return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def kill_after_checkpoint(cmd: list[str], env: dict[str, str], marker: pathlib.Path,
                          timeout: float = 600) -> None:
  """Starts ``cmd`` (a trainer) and SIGKILLs it as soon as ``marker`` (a checkpoint's commit file)
  exists; fails the test if the run ended first."""
  proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + timeout
  while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert marker.exists(), "the run ended before its first checkpoint"


def fixtures_root() -> pathlib.Path:
  return pathlib.Path(os.environ.get("V2W_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  root = fixtures_root()
  if not root.is_dir():
    pytest.fail(f"golden fixtures not found at {root}: set V2W_FIXTURES to the fixtures folder")
  return root


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
  return REPO_ROOT


@pytest.fixture(scope="session")
def load_fixture_npz(fixtures_dir: pathlib.Path) -> Callable[[str], dict[str, np.ndarray]]:
  """``load_fixture_npz("samplers/rf_unipc.npz")``: every array of a golden ``.npz`` under the fixtures
  folder, as a new dict per call; a missing file fails the test that asks for it, naming the path."""

  def load(rel: str) -> dict[str, np.ndarray]:
    path = fixtures_dir / rel
    if not path.is_file():
      pytest.fail(f"missing fixture {path}")
    with np.load(path) as z:
      return dict(z)

  return load


@pytest.fixture(scope="session")
def load_fixture_json(fixtures_dir: pathlib.Path) -> Callable[[str], dict]:
  """``load_fixture_json("samplers/metrics.json")``: a JSON file of the fixtures folder (e.g. the measured
  reference errors that tolerances derive from); a missing file fails the test that asks for it."""

  def load(rel: str) -> dict:
    path = fixtures_dir / rel
    if not path.is_file():
      pytest.fail(f"missing fixture {path}")
    return json.loads(path.read_text())

  return load


def fixture_npz_keys(rel: str) -> list[str]:
  """Array names of a golden ``.npz``, read at collection time to parametrize tests ([] if it is missing;
  the tests that load the file then fail naming it)."""
  path = fixtures_root() / rel
  if not path.is_file():
    return []
  with np.load(path) as z:
    return list(z.files)


def sampler_runs(keys) -> list[str]:
  """Run names of a sampler fixture (samplers/README): each run stores its settings as ``<run>_guidance``,
  ``<run>_num_steps``, ...; the names themselves mean nothing."""
  return sorted(k[: -len("_guidance")] for k in keys if k.endswith("_guidance"))


def run_arrays(data: dict[str, np.ndarray], run: str) -> dict[str, np.ndarray]:
  """The arrays of one sampler run, without the ``<run>_`` prefix."""
  prefix = run + "_"
  return {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}


def pick_run(data: dict[str, np.ndarray], what: str, where: Callable[[dict[str, np.ndarray]], bool],
             key: Callable[[dict[str, np.ndarray]], float] | None = None) -> str:
  """The run whose settings satisfy ``where`` (the smallest by ``key``, else the first by name); a fixture
  without one fails the test, saying what kind of run it needs."""
  runs = [r for r in sampler_runs(data) if where(run_arrays(data, r))]
  if not runs:
    pytest.fail(f"the fixture has no run {what} (runs: {sampler_runs(data)})")
  return min(runs, key=lambda r: key(run_arrays(data, r))) if key else runs[0]


def closed_form_run(data: dict[str, np.ndarray]) -> str:
  """The run whose exact endpoint is ``gauss_analytic`` (samplers/README: guidance 0, no conditional
  frames, no coupling)."""
  return pick_run(data, "with a closed-form answer (guidance 0, no conditional frames, no coupling)",
                  lambda r: float(r["guidance"]) == 0 and int(r["num_cond_frames"]) == 0
                  and not bool(r["use_coupling"]))


@pytest.fixture(scope="session")
def reference_file() -> Callable[[str], pathlib.Path]:
  """``reference_file(name)``: a file of the reference folder (``$V2W_REFERENCE``, default ``reference/``
  next to the fixtures root); a missing file fails the test that asks for it, naming the path."""

  def find(name: str) -> pathlib.Path:
    env = os.environ.get("V2W_REFERENCE")
    path = (pathlib.Path(env) if env else fixtures_root().parent / "reference") / name
    if not path.is_file():
      pytest.fail(f"{path} not found: set V2W_REFERENCE to the reference folder")
    return path

  return find


@dataclasses.dataclass(frozen=True)
class VAEFixture:
  """The ``wan_vae_tiny`` golden folder: config.json, the converted weights and the case arrays."""

  cfg: VAEConfig
  config: dict
  params: dict
  inputs: dict
  outputs: dict

  @property
  def cases(self) -> list[str]:
    return list(self.config["cases"])


@pytest.fixture(scope="session")
def wan_vae_tiny(fixtures_dir: pathlib.Path) -> VAEFixture:
  """The VAE golden fixture, loaded once per session (tests only read it)."""
  # Imported here so that collecting the other tests does not import the model code.
  from v2w_jax.convert import torch_pt  # pylint: disable=import-outside-toplevel
  from v2w_jax.convert import vae as convert_vae  # pylint: disable=import-outside-toplevel
  from v2w_jax.models import vae as vae_lib  # pylint: disable=import-outside-toplevel

  d = fixtures_dir / "wan_vae_tiny"
  config = json.loads((d / "config.json").read_text())
  cfg = vae_lib.VAEConfig.from_fixture(config)
  params = convert_vae.torch_to_params(torch_pt.load(d / "weights.pt"), cfg)
  with np.load(d / "inputs.npz") as z, np.load(d / "outputs.npz") as o:
    return VAEFixture(cfg, config, params, dict(z), dict(o))

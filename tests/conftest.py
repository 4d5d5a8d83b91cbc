"""Shared pytest fixtures.

Golden fixtures come from ``$V2W_FIXTURES`` (default: ``../shared/fixtures`` next to the repository).
Parity tests read every size, head count and frame count from the fixture files themselves, so any
folder with the same layout must pass. Shared loaders: ``load_fixture_npz`` (golden ``.npz`` files) and
``reference_file`` (the reference folder's key lists and anchors).
"""

from __future__ import annotations

import os
import pathlib
from typing import Callable

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


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

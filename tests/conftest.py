"""Shared pytest fixtures.

Golden fixtures come from ``$V2W_FIXTURES`` (default: ``../shared/fixtures`` next to the repository).
Parity tests read every size, head count and frame count from the fixture files themselves, so any
folder with the same layout must pass.
"""

from __future__ import annotations

import os
import pathlib

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

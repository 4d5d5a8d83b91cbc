"""Nested-dict parameter trees addressed by key paths (shared by the DiT and VAE converters)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Path = tuple[str, ...]


def flatten(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
  """Leaf path -> leaf, depth first in the tree's key order (a leaf is anything but a Mapping)."""
  out: dict[Path, Any] = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def get_path(tree: Mapping[str, Any], path: Path) -> Any:
  """The subtree or leaf at ``path``."""
  for k in path:
    tree = tree[k]
  return tree


def set_path(tree: dict, path: Path, value: Any) -> None:
  """Stores ``value`` at ``path``, creating the intermediate dicts."""
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value

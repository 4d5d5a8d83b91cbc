"""Training checkpoints: a thin wrapper over orbax's ``CheckpointManager``.

One checkpoint = one step folder ``<job>/checkpoints/<step>/`` holding three items:

* ``state``: the whole train-state pytree (parameters, optimizer state, EMA, step), saved
  asynchronously and restored straight into the shardings of an abstract state, so each process
  reads only its own shards and nothing is ever materialised whole on one host;
* ``data``: the grain iterator position of every process (``process_<i>-of-<n>.json``), so a resumed
  run continues at the exact next sample;
* ``meta``: JSON with the step, the base RNG seed and the resolved config, for humans and tools.

Orbax writes each step to a temporary folder and renames it when complete, so a killed run never
leaves a half-written checkpoint that a restart would pick up. A complete one can still go bad later
(a full disk, a copy cut short): :mod:`v2w_jax.training.resume` reads the metadata described here
before restoring, and moves an unusable step folder aside with :meth:`Checkpointer.move_aside`.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath


class Checkpointer:
  """Saves and restores (state, data iterator, metadata) triples under one directory."""

  def __init__(self, directory: str | pathlib.Path, *, keep: int, async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        create=True,
        cleanup_tmp_directories=True,
    )
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=options,
        item_names=("state", "data", "meta"),
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        },
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any | None, meta: dict, *, force: bool = False) -> bool:
    """Starts an (asynchronous) save of step `step`; returns whether a save was started."""
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state: Any, data_iterator: Any | None) -> tuple[Any, dict]:
    """Restores `step` into the shardings of `abstract_state`; `data_iterator` is set in place."""
    items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], restored["meta"]

  def step_dir(self, step: int) -> pathlib.Path:
    return self.directory / str(step)

  def saved_state_tree(self, step: int) -> Any:
    """The saved state's tree of orbax ``ArrayMetadata`` (shape, dtype per leaf), read without restoring.

    Raises whatever orbax raises for a step whose ``state/_METADATA`` is missing or unreadable.
    """
    meta = ocp.StandardCheckpointHandler().metadata(epath.Path(self.step_dir(step) / "state"))
    return getattr(meta, "tree", meta)

  def saved_meta(self, step: int) -> dict | None:
    """The step's ``meta`` item (step, seed, resolved config) as written by :meth:`save`, or None."""
    try:
      return json.loads((self.step_dir(step) / "meta" / "metadata").read_text())
    except (OSError, ValueError):
      return None

  def move_aside(self, step: int) -> pathlib.Path:
    """Renames an unusable step folder to ``<step>.corrupt[-N]`` (kept for inspection, no longer a step)."""
    src = self.step_dir(step)
    dst = src.with_name(f"{step}.corrupt")
    n = 1
    while dst.exists():
      n += 1
      dst = src.with_name(f"{step}.corrupt-{n}")
    src.rename(dst)
    return dst

  def reload(self) -> None:
    """Re-reads the list of steps from disk (after :meth:`move_aside`)."""
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a pytree of arrays: the restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)

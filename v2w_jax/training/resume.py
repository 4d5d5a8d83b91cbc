"""Which checkpoint a restarted job continues from: the newest intact one, if it fits the model.

A step folder can go bad after it was written (a data file cut short, a deleted ``_METADATA``): the
trainer then says which step it skips and why, moves the folder aside (``<step>.corrupt``, kept for
inspection) and resumes from the next older step. A checkpoint of ANOTHER model is not skipped: the
config changed since it was saved (``--config.model.num_blocks=3`` on a 2-block job), and
:class:`IncompatibleCheckpoint` names the job, the checkpoint and the changed settings, found from
the saved tree's metadata before orbax reads an array (whose own errors run to thousands of lines).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from v2w_jax.config_cli import flat_fields
from v2w_jax.convert.params_io import key_str
from v2w_jax.training.checkpoint import Checkpointer
from v2w_jax.user_errors import UserError

_log = logging.getLogger(__name__)

# Config groups that decide the train state's structure, shapes and dtypes.
STATE_CONFIG_GROUPS = ("model", "optim", "ema", "lora")
_ABSENT = "(absent)"


class IncompatibleCheckpoint(UserError):
  """The job's checkpoint holds another model than the config describes."""


class NoUsableCheckpoint(UserError):
  """Every checkpoint of the job is damaged."""


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  skipped: list[tuple[int, str]]  # (step, why it was unusable), newest first


def tree_differences(saved_tree: Any, abstract_state: Any) -> list[str]:
  """Every leaf missing, unexpected or of another shape/dtype in ``saved_tree`` (orbax metadata)."""
  saved = {key_str(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(saved_tree)[0]}
  wanted = {key_str(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
  out = [f"{k} is not in the checkpoint" for k in wanted if k not in saved]
  out += [f"{k} is in the checkpoint, not in the model" for k in saved if k not in wanted]
  for k, want in wanted.items():
    if k in saved:
      got = saved[k]
      got_sd = (tuple(got.shape), np.dtype(got.dtype))
      want_sd = (tuple(want.shape), np.dtype(want.dtype))
      if got_sd != want_sd:
        out.append(f"{k}: saved {got_sd[0]} {got_sd[1]}, now {want_sd[0]} {want_sd[1]}")
  return out


def config_changes(saved_config: dict | None, config: Any) -> list[str]:
  """``["model.num_blocks 2 -> 3", ...]``: fields of the state-shaping groups that differ from the saved config."""
  if not saved_config:
    return []
  now = json.loads(config.to_json_best_effort())
  before = flat_fields({g: saved_config.get(g, {}) for g in STATE_CONFIG_GROUPS})
  after = flat_fields({g: now.get(g, {}) for g in STATE_CONFIG_GROUPS})
  return [f"{k} {before.get(k, _ABSENT)!r} -> {after.get(k, _ABSENT)!r}"
          for k in sorted(set(before) | set(after)) if before.get(k, _ABSENT) != after.get(k, _ABSENT)]


def _first_line(err: BaseException) -> str:
  """The first line of the innermost cause (tensorstore names the file and byte range there)."""
  while (err.__cause__ or err.__context__) is not None:
    err = err.__cause__ or err.__context__
  text = str(err).strip()
  return f"{type(err).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _unreadable(step_dir: pathlib.Path, err: BaseException) -> str:
  if not (step_dir / "state").is_dir():
    return "its state/ folder is missing"
  if not (step_dir / "state" / "_METADATA").is_file():
    return "state/_METADATA is missing"
  return f"its state metadata does not read ({_first_line(err)})"


def _all_processes(ok: bool) -> bool:
  """Whether `ok` holds on every process (one decision for all: restores and saves are collective)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _incompatible(checkpointer: Checkpointer, step: int, config: Any, job: pathlib.Path,
                  diffs: list[str]) -> IncompatibleCheckpoint:
  meta = checkpointer.saved_meta(step) or {}
  changes = config_changes(meta.get("config"), config)
  what = (f"settings changed since it was saved: {', '.join(changes)}" if changes
          else "its saved config does not say which setting changed")
  return IncompatibleCheckpoint(
      f"cannot resume job {job} from its checkpoint {checkpointer.step_dir(step)}: the saved state does not "
      f"fit the configured model ({what}; {len(diffs)} array(s) differ, e.g. {diffs[0]}). Rerun with the "
      "settings it was saved with, or start another job with --config.job.name=<new name>")


def restore_newest_intact(checkpointer: Checkpointer, abstract_state: Any, data_iterator: Any, *,
                          config: Any, job: pathlib.Path) -> Restored | None:
  """Restores the newest usable checkpoint (state + data position); None when the job has none.

  Unusable steps newer than it are moved aside and reported. Raises:
    IncompatibleCheckpoint: a readable checkpoint does not fit the configured model.
    NoUsableCheckpoint: there are checkpoints but none can be restored.
  """
  skipped: list[tuple[int, str]] = []
  for step in sorted(checkpointer.all_steps(), reverse=True):
    problem, state = None, None
    try:
      saved_tree = checkpointer.saved_state_tree(step)
    except Exception as err:  # noqa: BLE001 - any failure to read the metadata makes the step unusable
      problem = _unreadable(checkpointer.step_dir(step), err)
    if problem is None:
      diffs = tree_differences(saved_tree, abstract_state)
      if diffs:
        raise _incompatible(checkpointer, step, config, job, diffs)
      try:
        state, _ = checkpointer.restore(step, abstract_state, data_iterator)
      except Exception as err:  # noqa: BLE001 - a damaged data file surfaces as any tensorstore error
        problem = f"restoring it failed ({_first_line(err)})"
    if _all_processes(problem is None):
      _set_aside(checkpointer, skipped, step)
      return Restored(step, state, skipped)
    problem = problem or "restoring it failed on another process"
    _log.warning("checkpoint %s is unusable: %s; trying the one before it", checkpointer.step_dir(step), problem)
    skipped.append((step, problem))
  if skipped:
    listing = "; ".join(f"step {s}: {why}" for s, why in skipped)
    raise NoUsableCheckpoint(f"no usable checkpoint in {checkpointer.directory} ({listing}). Move that folder "
                             "away to start the job over")
  return None


def _set_aside(checkpointer: Checkpointer, skipped: list[tuple[int, str]], resumed: int) -> None:
  """Moves the skipped (newer) steps aside, so that new saves are the job's latest checkpoints again."""
  if not skipped:
    return
  if jax.process_index() == 0:
    for step, _ in skipped:
      moved = checkpointer.move_aside(step)
      _log.warning("moved the unusable checkpoint step %d to %s; resuming from step %d", step, moved, resumed)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("v2w_resume_set_aside")
  checkpointer.reload()

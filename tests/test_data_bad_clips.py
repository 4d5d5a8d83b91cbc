"""A clip truncated after a front ``moov`` (its header still lists every frame): one frame count in every
message, caught by the start-up check, and at run time replaced deterministically, counted and named once."""

from __future__ import annotations

import logging
import pathlib
import re

import av
import numpy as np
import pytest

from configs import tiny
from v2w_jax.data import dataset as dataset_lib
from v2w_jax.data import sample_dataset as sd
from v2w_jax.data import video as video_lib

BAD = "sample_0002.mp4"


def truncate_keeping_header(video: pathlib.Path, fraction: float) -> None:
  """Rewrites ``video`` with the moov atom in front, then cuts off its tail."""
  tmp = video.with_name("faststart.mp4")
  with av.open(str(video)) as inp, av.open(str(tmp), "w", options={"movflags": "faststart"}) as out:
    stream = out.add_stream_from_template(inp.streams.video[0])
    for packet in inp.demux(inp.streams.video[0]):
      if packet.dts is not None:
        packet.stream = stream
        out.mux(packet)
  data = tmp.read_bytes()
  tmp.unlink()
  video.write_bytes(data[: int(len(data) * fraction)])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """Four 24-frame clips; the third keeps its header but loses most of its frames."""
  c = tiny.get_config()
  root = tmp_path_factory.mktemp("bad_clips") / "ds"
  sd.make_sample_dataset(root, sd.spec_for_config(c, num_videos=4, frames=24))
  truncate_keeping_header(root / "videos" / BAD, 0.4)
  c.data.dataset_dir = str(root)
  c.data.val_dataset_dir = ""
  c.data.global_batch_size = 1
  c.data.skip_bad_files = True
  return c, root


def test_a_truncated_clip_reports_one_frame_count(dataset):
  _, root = dataset
  path = root / "videos" / BAD
  assert video_lib.probe_video(path).num_frames == 24  # the header promises every frame
  counts = set()
  for seed in range(6):
    with pytest.raises(video_lib.VideoError) as info:
      video_lib.decode_clip(path, 9, np.random.default_rng(seed), num_threads=1)
    match = re.search(r"only (\d+) of the 24 frames", str(info.value))
    assert match and "truncated or corrupt" in str(info.value), str(info.value)
    counts.add(int(match.group(1)))
  assert len(counts) == 1 and counts.pop() < 24  # the same count, whatever the window


def test_the_start_up_check_decodes_and_names_it(dataset):
  config, root = dataset
  c = config.copy_and_resolve_references()
  c.data.skip_bad_files = False
  with pytest.raises(dataset_lib.DataError, match=re.escape(str(root / "videos" / BAD))):
    dataset_lib.make_loader(c, process_index=0, process_count=1)
  it = dataset_lib.make_loader(config, process_index=0, process_count=1)  # skip_bad_files: left out
  assert it.num_bad_files == 1 and it.report.problems[0].path == str(root / "videos" / BAD)
  videos = dataset_lib.list_videos(root)
  assert {videos[int(next(it)["index"][0])].name for _ in range(9)} == {v.name for v in videos} - {BAD}


def _indices(it, n: int) -> list[int]:
  return [int(next(it)["index"][0]) for _ in range(n)]


def test_run_time_failures_are_replaced_deterministically_counted_and_named_once(dataset, caplog):
  config, root = dataset
  c = config.copy_and_resolve_references()
  c.data.check_at_start = False  # the clip reaches the loader
  bad_index = [v.name for v in dataset_lib.list_videos(root)].index(BAD)
  with caplog.at_level(logging.WARNING, logger=dataset_lib.__name__):
    it = dataset_lib.make_loader(c, process_index=0, process_count=1)
    stream = _indices(it, 12)  # three epochs of four clips
  assert bad_index not in stream and len(set(stream)) == 3
  assert it.num_skipped == 3  # drawn once per epoch, replaced each time
  named = [r for r in caplog.records if BAD in r.getMessage()]
  assert len(named) == 1 and "only" in named[0].getMessage()  # once per process, with the frame count
  # The same stream from a fresh loader, and from one resumed half-way.
  again = dataset_lib.make_loader(c, process_index=0, process_count=1)
  first = _indices(again, 6)
  resumed = dataset_lib.make_loader(c, process_index=0, process_count=1, start_state=again.get_state())
  assert first + _indices(resumed, 6) == stream


@pytest.mark.slow
def test_the_trainer_reports_run_time_replacements(dataset, tmp_path):
  """``data_skipped`` in metrics.jsonl, and the file named once in the log."""
  import json  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  from conftest import REPO_ROOT  # pylint: disable=import-outside-toplevel

  _, root = dataset
  cmd = [sys.executable, "-m", "v2w_jax.train", "--config=configs/tiny.py", f"--config.data.dataset_dir={root}",
         "--config.data.val_dataset_dir=", "--config.data.make_sample_dataset=False",
         "--config.data.check_at_start=False", "--config.data.skip_bad_files=True",
         "--config.trainer.max_iter=4", "--config.trainer.logging_iter=2", "--config.trainer.save_iter=4",
         "--config.trainer.run_validation=False", "--config.trainer.sample_iter=0",
         "--config.checkpoint.async_save=False"]
  env = dict(os.environ, V2W_OUTPUT_ROOT=str(tmp_path), JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  rows = [json.loads(l) for l in (tmp_path / "cosmos_predict_v2p5/video2world/tiny/metrics.jsonl").read_text().splitlines()]
  skipped = [r["train/data_skipped"] for r in rows if "train/data_skipped" in r]
  assert skipped == [1.0, 2.0], rows  # batch 2 over 4 clips: the bad one is drawn once per 2 steps
  log = proc.stdout + proc.stderr
  assert log.count(f"replacing bad training sample {root / 'videos' / BAD}") == 1, log[-4000:]
  assert "2 bad training sample(s) replaced so far" in log

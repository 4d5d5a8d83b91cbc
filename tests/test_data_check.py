"""Bad input: the checker names every broken file; the loader raises with the list or skips and counts."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import av
import numpy as np
import pytest

from configs import tiny
from v2w_jax.data import check as check_lib
from v2w_jax.data import dataset as dataset_lib
from v2w_jax.data import sample_dataset as sd
from v2w_jax.data import text as text_lib
from v2w_jax.data import video as video_lib

GOOD = ("sample_0000", "sample_0001", "sample_0002")


def _faststart_copy(src: pathlib.Path, dst: pathlib.Path) -> None:
  """Remuxes with the moov atom in front, so a truncated copy keeps valid metadata."""
  with av.open(str(src)) as inp, av.open(str(dst), "w", options={"movflags": "faststart"}) as out:
    stream = out.add_stream_from_template(inp.streams.video[0])
    for packet in inp.demux(inp.streams.video[0]):
      if packet.dts is not None:
        packet.stream = stream
        out.mux(packet)


def _build_broken(root: pathlib.Path, config) -> dict[str, str]:
  """A dataset with three good clips and one broken file per failure mode; returns stem -> expected reason."""
  names = list(GOOD) + ["truncated", "garbage", "short", "no_caption", "no_embedding", "bad_shape", "bad_dtype", "empty"]
  captions = tuple(f"caption {n}" for n in names)
  spec = sd.spec_for_config(config, num_videos=len(names), frames=14, captions=captions)
  sd.make_sample_dataset(root, spec)
  videos, metas = root / "videos", root / "metas"
  for i, name in enumerate(names):  # give the files readable names
    if name not in GOOD:
      (videos / f"sample_{i:04d}.mp4").rename(videos / f"{name}.mp4")
      (metas / f"sample_{i:04d}.txt").rename(metas / f"{name}.txt")
  data = (videos / "truncated.mp4").read_bytes()
  (videos / "truncated.mp4").write_bytes(data[: len(data) // 2])  # moov atom lost
  (videos / "garbage.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
  (videos / "empty.mp4").write_bytes(b"")
  video_lib.write_mp4(videos / "short.mp4", sd.render_frames(5, spec.height, spec.width, seed=9))
  (metas / "no_caption.txt").unlink()
  store = text_lib.TextEmbeddingStore(root / "text_embeddings")
  store.path_for("caption no_embedding").unlink()
  np.save(store.path_for("caption bad_shape"), np.zeros((3, 5), np.uint16))
  np.save(store.path_for("caption bad_dtype"), np.zeros((spec.text_tokens, spec.text_width), np.float64))
  return {
      "truncated": "cannot open the video container",
      "garbage": "cannot open the video container",
      "empty": "file is empty",
      "short": "5 frames, fewer than the 9",
      "no_caption": "caption file",
      "no_embedding": "embedding file missing",
      "bad_shape": "shape (3, 5), expected (16, 48)",
      "bad_dtype": "dtype float64 on disk, expected bfloat16",
  }


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
  c = tiny.get_config()
  root = tmp_path_factory.mktemp("broken") / "ds"
  expected = _build_broken(root, c)
  c.data.dataset_dir = str(root)
  c.data.val_dataset_dir = ""
  return c, root, expected


def test_check_names_every_bad_file_and_reason(broken):
  config, root, expected = broken
  report = check_lib.check_dataset(root, config)
  assert report.num_videos == len(GOOD) + len(expected)
  bad = {pathlib.Path(p.path).stem: p.reason for p in report.problems}
  assert set(bad) == set(expected)
  for stem, reason in expected.items():
    assert reason in bad[stem], (stem, bad[stem])
  text = report.format()
  for stem in expected:
    assert str(root / "videos" / f"{stem}.mp4") in text
  assert f"{len(GOOD)} usable" in text


def test_loader_raises_with_the_full_list(broken):
  config, _, expected = broken
  with pytest.raises(dataset_lib.DataError) as info:
    dataset_lib.make_loader(config, process_index=0, process_count=1)
  for stem in expected:
    assert f"{stem}.mp4" in str(info.value)


def test_loader_skips_and_counts_bad_files(broken):
  config, _, expected = broken
  c = config.copy_and_resolve_references()
  c.data.skip_bad_files = True
  it = dataset_lib.make_loader(c, process_index=0, process_count=1)
  assert it.num_bad_files == len(expected)
  seen = {int(i) for _ in range(6) for i in next(it)["index"]}
  videos = dataset_lib.list_videos(c.data.dataset_dir)
  assert {videos[i].stem for i in seen} <= set(GOOD)


def test_runtime_decode_error_raises_naming_the_file(broken):
  config, root, _ = broken
  c = config.copy_and_resolve_references()
  c.data.check_at_start = False
  c.data.global_batch_size = 1
  it = dataset_lib.make_loader(c, process_index=0, process_count=1)
  with pytest.raises(dataset_lib.DataError, match=r"(truncated|garbage|short|empty|no_caption|no_embedding|bad_shape|bad_dtype)"):
    for _ in range(len(dataset_lib.list_videos(root)) + 1):
      next(it)


def test_runtime_errors_skipped_and_counted(broken):
  config, _, _ = broken
  c = config.copy_and_resolve_references()
  c.data.check_at_start = False
  c.data.skip_bad_files = True
  c.data.global_batch_size = 1
  it = dataset_lib.make_loader(c, process_index=0, process_count=1)
  videos = dataset_lib.list_videos(c.data.dataset_dir)
  stems = {videos[int(next(it)["index"][0])].stem for _ in range(2 * len(videos))}
  assert stems <= set(GOOD)
  assert it.num_skipped > 0


def test_file_that_goes_bad_during_training_fails_in_a_worker_without_hanging(tmp_path):
  c = tiny.get_config()
  c.data.dataset_dir = str(tmp_path / "ds")
  c.data.num_workers = 1
  c.data.global_batch_size = 1
  sd.make_sample_dataset(c.data.dataset_dir, sd.spec_for_config(c, num_videos=2, frames=12))
  it = dataset_lib.make_loader(c, process_index=0, process_count=1)  # passes the start-up check
  try:
    for video in dataset_lib.list_videos(c.data.dataset_dir):
      video.write_bytes(b"not a video any more")
    with pytest.raises(Exception, match=r"sample_000[01]\.mp4"):
      for _ in range(4):
        next(it)
  finally:
    it.close()


def test_truncated_after_front_moov_needs_decode_check(tmp_path):
  c = tiny.get_config()
  root = tmp_path / "ds"
  sd.make_sample_dataset(root, sd.spec_for_config(c, num_videos=2, frames=14))
  video = root / "videos" / "sample_0001.mp4"
  _faststart_copy(video, tmp_path / "fs.mp4")
  data = (tmp_path / "fs.mp4").read_bytes()
  video.write_bytes(data[: int(len(data) * 0.6)])
  assert check_lib.check_dataset(root, c).ok  # the header is intact: the fast check cannot see it
  report = check_lib.check_dataset(root, c, decode=True)
  assert [pathlib.Path(p.path).name for p in report.problems] == ["sample_0001.mp4"]
  assert "last frame does not decode" in report.problems[0].reason


def test_store_of_the_wrong_width_is_reported(tmp_path):
  c = tiny.get_config()
  root = tmp_path / "ds"
  sd.make_sample_dataset(root, sd.spec_for_config(c, num_videos=2, frames=12, text_width=32))
  report = check_lib.check_dataset(root, c)
  assert len(report.problems) == 2
  assert "crossattn_proj_in_channels" in report.problems[0].reason


def test_unusable_folders(tmp_path):
  c = tiny.get_config()
  with pytest.raises(dataset_lib.DataError, match="does not exist"):
    check_lib.check_dataset(tmp_path / "nope", c)
  (tmp_path / "novideos").mkdir()
  with pytest.raises(dataset_lib.DataError, match="no videos/ folder"):
    check_lib.check_dataset(tmp_path / "novideos", c)
  (tmp_path / "empty" / "videos").mkdir(parents=True)
  with pytest.raises(dataset_lib.DataError, match=r"no \.mp4 files"):
    check_lib.check_dataset(tmp_path / "empty", c)
  c.data.dataset_dir = str(tmp_path / "empty")
  with pytest.raises(dataset_lib.DataError, match=r"no \.mp4 files"):
    dataset_lib.make_loader(c, process_index=0, process_count=1)


def test_missing_store_is_reported_per_file(tmp_path):
  c = tiny.get_config()
  root = tmp_path / "ds"
  sd.make_sample_dataset(root, sd.spec_for_config(c, num_videos=2, frames=12))
  for f in (root / "text_embeddings").iterdir():
    f.unlink()
  report = check_lib.check_dataset(root, c)
  assert len(report.problems) == 2 and "index.json" in report.problems[0].reason


def test_cli(broken, repo_root):
  _, root, expected = broken
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "v2w_jax.data.check", str(root), "--config=configs/tiny.py"],
      cwd=repo_root, capture_output=True, text=True, env=env, timeout=120,
  )
  assert proc.returncode == 1, proc.stderr
  for stem in expected:
    assert f"{stem}.mp4" in proc.stdout

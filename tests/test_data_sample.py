"""The synthetic sample dataset, its stand-in text encoder, and tools/create_prompts.py."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from configs import tiny
from conftest import file_snapshot, make_users_dataset
from tools import create_prompts
from v2w_jax.data import check as check_lib
from v2w_jax.data import dataset as dataset_lib
from v2w_jax.data import sample_dataset as sd
from v2w_jax.data import text as text_lib
from v2w_jax.data import video as video_lib


def test_render_is_deterministic_and_moving():
  a = sd.render_frames(6, 32, 48, seed=1)
  np.testing.assert_array_equal(a, sd.render_frames(6, 32, 48, seed=1))
  assert not np.array_equal(a, sd.render_frames(6, 32, 48, seed=2))
  assert all(np.abs(a[i + 1].astype(int) - a[i]).mean() > 1 for i in range(5))  # content moves every frame


def test_tiny_sample_dataset_is_usable_and_deterministic(tmp_path):
  c = tiny.get_config()
  c.data.dataset_dir = c.data.sample_dataset_dir = str(tmp_path / "a")
  root = sd.ensure_sample_dataset(c)
  report = check_lib.check_dataset(root, c)
  assert report.ok and report.num_videos >= 2, report.format()
  videos = dataset_lib.list_videos(root)
  info = video_lib.probe_video(videos[0])
  assert info.num_frames > c.data.num_frames  # windows can vary
  assert info.codec == "h264"
  # A second build with the same seed gives the same pixels and embeddings.
  other = sd.make_sample_dataset(tmp_path / "b", sd.spec_for_config(c))
  for v in videos:
    x = video_lib.decode_clip(v, 4, start=2).video
    y = video_lib.decode_clip(other / "videos" / v.name, 4, start=2).video
    np.testing.assert_array_equal(x, y)
  caption = dataset_lib.read_caption(videos[0])
  assert caption == sd.DEFAULT_CAPTION
  e1 = text_lib.TextEmbeddingStore(root / "text_embeddings").load(caption)
  e2 = text_lib.TextEmbeddingStore(other / "text_embeddings").load(caption)
  np.testing.assert_array_equal(e1.view(np.uint16), e2.view(np.uint16))
  assert text_lib.TextEmbeddingStore(root / "text_embeddings").info().encoder == sd.TOY_ENCODER
  # ensure_* keeps a complete dataset as it is.
  stamp = videos[0].stat().st_mtime_ns
  sd.ensure_sample_dataset(c)
  assert videos[0].stat().st_mtime_ns == stamp


def test_sample_dataset_never_written_into_a_users_dataset_folder(tmp_path):
  users = make_users_dataset(tmp_path / "mine")
  before = file_snapshot(users)
  c = tiny.get_config()
  c.data.sample_dataset_dir = str(tmp_path / "sample")
  c.data.dataset_dir = str(users)  # the tiny config with the user's folder: read it, never write it
  c.data.val_dataset_dir = str(users)
  c.data.embeddings_dir = str(users / "text_embeddings")
  assert sd.ensure_sample_dataset(c) is None
  assert file_snapshot(users) == before and not (tmp_path / "sample").exists()
  # Named as the sample folder itself, a folder of other files is refused, untouched.
  c.data.sample_dataset_dir = str(users)
  with pytest.raises(sd.NotASampleDatasetFolder, match=r"data\.sample_dataset_dir=.*mine: the folder holds files"):
    sd.ensure_sample_dataset(c)
  with pytest.raises(sd.NotASampleDatasetFolder):
    sd.make_sample_dataset(users, sd.spec_for_config(c), overwrite=True)
  assert file_snapshot(users) == before


def test_sample_dataset_goes_to_its_own_folder_with_its_own_embeddings(tmp_path):
  c = tiny.get_config()
  c.data.sample_dataset_dir = c.data.val_dataset_dir = str(tmp_path / "sample")
  c.data.dataset_dir = str(tmp_path / "mine")  # does not exist: not created (the trainer reports it)
  c.data.embeddings_dir = str(tmp_path / "store")
  root = sd.ensure_sample_dataset(c)  # validation reads the sample folder: it is made there
  assert root == tmp_path / "sample" and (root / "text_embeddings" / "index.json").is_file()
  assert not (tmp_path / "mine").exists() and not (tmp_path / "store").exists()
  # An interrupted build (marker, no .complete) is ours to finish; an empty folder is fine too.
  (root / sd.COMPLETE_MARKER).unlink()
  assert sd.make_sample_dataset(root, sd.spec_for_config(c)) == root and (root / sd.COMPLETE_MARKER).is_file()
  (tmp_path / "empty").mkdir()
  sd.make_sample_dataset(tmp_path / "empty", sd.SampleSpec(num_videos=1, frames=4, height=16, width=16))


def test_make_sample_dataset_cli_refuses_a_users_folder(tmp_path, repo_root):
  users = make_users_dataset(tmp_path / "mine")
  before = file_snapshot(users)
  proc = subprocess.run([sys.executable, "tools/make_sample_dataset.py", str(users), "--overwrite"],
                        cwd=repo_root, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1, proc.stderr
  assert file_snapshot(users) == before


def test_toy_encoder_looks_like_the_real_pipeline():
  e = sd.toy_text_embedding("A video of sks teal robot.", 16, 48)
  assert e.shape == (16, 48) and e.dtype == text_lib.BF16
  f = e.astype(np.float32)
  np.testing.assert_allclose(f.mean(-1), 0, atol=0.03)  # standardised per token (bf16 rounding)
  np.testing.assert_allclose(f.std(-1, ddof=1), 1, atol=0.03)
  assert np.abs(f[8:]).max() > 0.5  # pad rows kept, like the real encoder's
  g = sd.toy_text_embedding("A video of sks red robot.", 16, 48).astype(np.float32)
  assert not np.array_equal(f, g)
  np.testing.assert_array_equal(f[:4], g[:4])  # causal-ish: the first words agree
  np.testing.assert_array_equal(sd.toy_text_embedding("x", 4, 8, seed=0).view(np.uint16), sd.toy_text_embedding("x", 4, 8, seed=0).view(np.uint16))


def test_make_sample_dataset_cli(tmp_path, repo_root):
  out = tmp_path / "cli"
  proc = subprocess.run(
      [sys.executable, "tools/make_sample_dataset.py", str(out), "--num_videos", "2", "--frames", "10", "--height", "32",
       "--width", "64", "--text_tokens", "4", "--text_width", "8", "--caption", "one", "--caption", "two"],
      cwd=repo_root, capture_output=True, text=True, timeout=120,
  )
  assert proc.returncode == 0, proc.stderr
  assert sorted(p.read_text().strip() for p in (out / "metas").iterdir()) == ["one", "two"]
  store = text_lib.TextEmbeddingStore(out / "text_embeddings")
  assert store.load("two").shape == (4, 8)
  assert video_lib.probe_video(out / "videos" / "sample_0001.mp4").num_frames == 10


def test_odd_sizes_are_refused(tmp_path):
  with pytest.raises(ValueError, match="even"):
    video_lib.write_mp4(tmp_path / "x.mp4", np.zeros((2, 31, 48, 3), np.uint8))


# ----------------------------------------------------------------------------------------------
# create_prompts


def test_create_prompts_fills_only_missing_captions(tmp_path):
  (tmp_path / "videos").mkdir()
  for name in ("a", "b", "c"):
    (tmp_path / "videos" / f"{name}.mp4").write_bytes(b"")
  (tmp_path / "metas").mkdir()
  (tmp_path / "metas" / "b.txt").write_text("keep me")
  written = create_prompts.create_prompts(tmp_path)
  assert [p.name for p in written] == ["a.txt", "c.txt"]
  assert (tmp_path / "metas" / "a.txt").read_text() == create_prompts.DEFAULT_PROMPT
  assert (tmp_path / "metas" / "b.txt").read_text() == "keep me"
  assert create_prompts.create_prompts(tmp_path, "other") == []
  assert create_prompts.main([str(tmp_path), "--prompt", "x"]) == 0


def test_create_prompts_errors(tmp_path, capsys):
  with pytest.raises(create_prompts.PromptError, match="does not exist"):
    create_prompts.create_prompts(tmp_path / "missing")
  with pytest.raises(create_prompts.PromptError, match="no videos/ folder"):
    create_prompts.create_prompts(tmp_path)
  (tmp_path / "videos").mkdir()
  with pytest.raises(create_prompts.PromptError, match=r"no \.mp4 files"):
    create_prompts.create_prompts(tmp_path)
  assert create_prompts.main([str(tmp_path)]) == 1
  assert "no .mp4 files" in capsys.readouterr().err

"""The latent cache (data/latent_cache.py, data/latent_cache_build.py): build, resume, process split,
the loader's draws, start-up checks, and equivalence with the online path (tiny config, random VAE, CPU).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest

from configs import tiny
from v2w_jax.convert import params_io
from v2w_jax.data import dataset as dataset_lib
from v2w_jax.data import latent_cache
from v2w_jax.data import latent_cache_build
from v2w_jax.data import sample_dataset as sd
from v2w_jax.data import text as text_lib
from v2w_jax.data import video as video_lib

NUM_CLIPS = 3
CLIP_FRAMES = 16  # tiny windows are 9 frames: 8 valid starts, 3 cached


def _config(dataset: pathlib.Path, cache: pathlib.Path | str = "", windows: int = 3):
  c = tiny.get_config()
  c.data.dataset_dir = str(dataset)
  c.data.val_dataset_dir = ""
  c.data.make_sample_dataset = False
  c.data.latent_cache.windows_per_clip = windows
  c.data.latent_cache.dir = str(cache)
  return c


def _build(config, out, **kw):
  kw.setdefault("process_index", 0)
  kw.setdefault("process_count", 1)
  return latent_cache_build.build_cache(config, config.data.dataset_dir, out, progress=False, **kw)


def _loader(config, **kw):
  return dataset_lib.make_loader(config, process_index=0, process_count=1, **kw)


def _entries(root) -> dict[str, tuple[dict, np.ndarray]]:
  cache = latent_cache.LatentCache(root)
  out = {}
  for stem in sorted(cache.committed()):
    attrs = cache.entry_attrs(stem)
    out[stem] = (attrs, np.stack([cache.read_window(stem, k) for k in range(len(attrs["window_starts"]))]))
  return out


def _assert_same_entries(a, b):
  assert a.keys() == b.keys()
  for stem in a:
    assert a[stem][0] == b[stem][0], stem
    np.testing.assert_array_equal(a[stem][1].view(np.uint16), b[stem][1].view(np.uint16), err_msg=stem)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """A dataset of 3 clips (two captions) and its cache, 3 windows per clip."""
  root = tmp_path_factory.mktemp("latent_cache")
  config = _config(root / "data", root / "cache")
  sd.make_sample_dataset(config.data.dataset_dir, sd.spec_for_config(
      config, num_videos=NUM_CLIPS, frames=CLIP_FRAMES, captions=("a teal robot", "a red robot")))
  result = _build(config, root / "cache")
  return config, root / "cache", result


# ---- pieces -------------------------------------------------------------------------------------


def test_spread_starts_cover_the_clip():
  assert video_lib.spread_starts(16, 9, 3) == [0, 4, 7]
  assert video_lib.spread_starts(16, 9, 1) == [0]
  assert video_lib.spread_starts(10, 9, 5) == [0, 1]  # only two valid positions
  assert video_lib.spread_starts(9, 9, 4) == [0]
  with pytest.raises(ValueError, match="fewer than"):
    video_lib.spread_starts(8, 9, 1)


def test_fingerprint_tells_weights_apart_whatever_their_placement():
  params = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}, "b": np.ones(2, np.float32)}
  fp = params_io.fingerprint(params)
  assert fp == params_io.fingerprint(jax.tree.map(jax.numpy.asarray, params))
  changed = {"a": {"kernel": params["a"]["kernel"].copy()}, "b": params["b"]}
  changed["a"]["kernel"][1, 2] = np.nextafter(np.float32(5), np.float32(6))
  assert params_io.fingerprint(changed) != fp
  renamed = {"a": {"bias": params["a"]["kernel"]}, "b": params["b"]}
  assert params_io.fingerprint(renamed) != fp


# ---- building ----------------------------------------------------------------------------------


def test_build_writes_one_bf16_record_per_window_with_its_metadata(built):
  config, cache_dir, result = built
  assert (result.encoded_clips, result.encoded_windows, result.failed) == (NUM_CLIPS, 3 * NUM_CLIPS, {})
  header = latent_cache.LatentCache(cache_dir).header()
  assert header["num_frames"] == 9 and header["video_size"] == [32, 48] and header["dtype"] == "bfloat16"
  assert header["latent_shape"] == [16, 3, 4, 6] and header["windows_per_clip"] == 3
  assert header["vae"]["base_dim"] == 8
  videos = dataset_lib.list_videos(config.data.dataset_dir)
  entries = _entries(cache_dir)
  assert sorted(entries) == [v.stem for v in videos]
  for video in videos:
    attrs, means = entries[video.stem]
    assert attrs["clip"] == video.stem and attrs["window_starts"] == [0, 4, 7]
    assert attrs["fps"] == 16.0 and attrs["total_frames"] == CLIP_FRAMES
    assert attrs["caption_key"] == text_lib.caption_key(dataset_lib.read_caption(video))
    assert attrs["vae_fingerprint"] == header["vae_fingerprint"] and attrs["latent_shape"] == header["latent_shape"]
    assert means.dtype == ml_dtypes.bfloat16 and means.shape == (3, 16, 3, 4, 6)
    assert np.all(np.isfinite(means.astype(np.float32))) and not np.array_equal(means[0], means[2])
  # One chunk (record) per window.
  zarray = json.loads((cache_dir / "clips" / videos[0].stem / ".zarray").read_text())
  assert zarray["chunks"] == [1, 16, 3, 4, 6]


def test_processes_split_the_clips_and_together_build_the_same_cache(built, tmp_path):
  config, cache_dir, _ = built
  out = tmp_path / "split"
  first = _build(config, out, process_index=0, process_count=2)
  assert latent_cache.LatentCache(out).committed() == {"sample_0000", "sample_0002"}
  second = _build(config, out, process_index=1, process_count=2)
  assert (first.clips, second.clips) == (2, 1)
  _assert_same_entries(_entries(out), _entries(cache_dir))


def test_a_killed_build_leaves_no_half_entry_and_the_next_run_completes_it(built, tmp_path, monkeypatch):
  config, cache_dir, _ = built
  out = tmp_path / "killed"
  real_rename = os.rename
  commits = []

  def rename(src, dst):
    if pathlib.Path(dst).parent == out / "clips":
      commits.append(dst)
      if len(commits) == 2:
        raise KeyboardInterrupt  # killed between writing the second entry and committing it
    return real_rename(src, dst)

  monkeypatch.setattr(latent_cache.os, "rename", rename)
  with pytest.raises(KeyboardInterrupt):
    _build(config, out)
  monkeypatch.setattr(latent_cache.os, "rename", real_rename)
  assert latent_cache.LatentCache(out).committed() == {"sample_0000"}
  report = latent_cache.check_cache(out, config, dataset_lib.list_videos(config.data.dataset_dir))
  assert report.missing == ["sample_0001", "sample_0002"] and report.unfinished == 1 and not report.ok

  resumed = _build(config, out)
  assert (resumed.already_cached, resumed.encoded_clips, resumed.unfinished_removed) == (1, 2, 1)
  assert not any((out / ".tmp").rglob("*.zarray"))
  _assert_same_entries(_entries(out), _entries(cache_dir))


def test_an_unreadable_clip_is_left_out_and_named_the_others_are_cached(built, tmp_path):
  config, _, _ = built
  data = tmp_path / "data"
  shutil.copytree(config.data.dataset_dir, data)
  (data / "videos" / "sample_0001.mp4").write_bytes(b"not a video")
  result = _build(_config(data), tmp_path / "cache")
  assert list(result.failed) == [str(data / "videos" / "sample_0001.mp4")]
  assert latent_cache.LatentCache(tmp_path / "cache").committed() == {"sample_0000", "sample_0002"}


def test_build_refuses_a_cache_of_another_setting_before_loading_the_vae(built, monkeypatch):
  config, cache_dir, _ = built
  config = _config(config.data.dataset_dir, cache_dir, windows=2)
  monkeypatch.setattr(latent_cache_build, "_encoder", lambda *a: pytest.fail("loaded the VAE first"))
  with pytest.raises(latent_cache.LatentCacheError, match=r"windows_per_clip 3 \(config 2\)"):
    _build(config, cache_dir)


# ---- loading -----------------------------------------------------------------------------------


def test_loader_draws_cached_windows_seeded_and_resumes_exactly(built):
  config, cache_dir, _ = built
  config = _config(config.data.dataset_dir, cache_dir)
  batch = next(_loader(config))
  assert set(batch) == {"latents", "text_embeddings", "padding_mask", "fps", "index", "window_start"}
  assert batch["latents"].shape == (2, 16, 3, 4, 6) and batch["latents"].dtype == ml_dtypes.bfloat16
  entries = _entries(cache_dir)
  videos = dataset_lib.list_videos(config.data.dataset_dir)
  it = _loader(config)
  stream = [next(it) for _ in range(9)]
  starts = set()
  for b in stream:
    for i, idx in enumerate(b["index"]):
      attrs, means = entries[videos[idx].stem]
      k = attrs["window_starts"].index(int(b["window_start"][i]))
      np.testing.assert_array_equal(b["latents"][i].view(np.uint16), means[k].view(np.uint16))
      starts.add(int(b["window_start"][i]))
  assert len(starts) > 1  # the draw varies
  again = next(_loader(config))  # the same seed, the same draws
  np.testing.assert_array_equal(again["window_start"], stream[0]["window_start"])
  it = _loader(config)
  for _ in range(4):
    next(it)
  resumed = _loader(config, start_state=it.get_state())
  for b in stream[4:]:
    r = next(resumed)
    np.testing.assert_array_equal(r["index"], b["index"])
    np.testing.assert_array_equal(r["window_start"], b["window_start"])


def test_cached_batches_feed_the_step_the_latents_the_online_path_computes(built, tmp_path):
  """The trainer's own batch function on a cached batch and on the same windows decoded and encoded.

  One clip per device, as the recipe trains (and as the cache encodes): XLA's convolutions may round
  a clip differently next to another one in a batch, online as well as in the cache.
  """
  from v2w_jax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from v2w_jax.parallel import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
  from v2w_jax.training import trainer  # pylint: disable=import-outside-toplevel

  config, cache_dir, _ = built
  config = _config(config.data.dataset_dir, cache_dir)
  config.data.global_batch_size = 1
  mesh = mesh_lib.make_mesh(config.mesh)
  model = trainer.build_model(config, mesh, tmp_path / "random_vae")
  latent_cache.check_vae_weights(config, model.vae_params)  # the trainer's weights are the tool's
  batch_sh = sharding_lib.batch_sharding(mesh)
  videos = dataset_lib.list_videos(config.data.dataset_dir)
  it = _loader(config)
  starts = set()
  for _ in range(4):
    cached = next(it)
    online = {k: v for k, v in cached.items() if k != "latents"}
    online["video"] = np.stack([
        video_lib.decode_clip(videos[i], 9, start=int(s), size=(32, 48)).video
        for i, s in zip(cached["index"], cached["window_start"])])
    a = trainer.device_batch(model, cached, batch_sh)
    b = trainer.device_batch(model, online, batch_sh)
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)
    starts.update(int(s) for s in cached["window_start"])
  assert starts - {0}, "only first windows were drawn: the test would not see a wrong window"


# ---- start-up checks ---------------------------------------------------------------------------


@pytest.mark.parametrize("override,message", [
    (dict(num_frames=13), r"num_frames 9 \(config 13\)"),
    (dict(video_size=(48, 64)), r"video_size \[32, 48\] \(config \[48, 64\]\)"),
    (dict(vae_dtype="float32"), r"vae.dtype bfloat16 \(config float32\)"),
], ids=["frames", "resolution", "vae_config"])
def test_a_cache_of_another_setting_is_one_error_naming_what_differs(built, override, message):
  config, cache_dir, _ = built
  config = _config(config.data.dataset_dir, cache_dir)
  if "vae_dtype" in override:
    config.vae.dtype = override["vae_dtype"]
  else:
    config.data.update(override)
  with pytest.raises(latent_cache.LatentCacheError, match=message) as err:
    _loader(config)
  assert "\n" not in str(err.value) and "tools/cache_latents.py" in str(err.value)


def test_missing_clips_and_foreign_entries_are_named(built, tmp_path):
  config, cache_dir, _ = built
  with pytest.raises(latent_cache.LatentCacheError, match=r"nowhere does not exist \(cache.json missing\)"):
    _loader(_config(config.data.dataset_dir, tmp_path / "nowhere"))
  copy = tmp_path / "cache"
  shutil.copytree(cache_dir, copy)
  shutil.rmtree(copy / "clips" / "sample_0001")
  config = _config(config.data.dataset_dir, copy)
  with pytest.raises(latent_cache.LatentCacheError, match=r"no latents for 1 of the 3 clips .*\(sample_0001\)"):
    _loader(config)
  attrs_path = copy / "clips" / "sample_0002" / ".zattrs"
  attrs = json.loads(attrs_path.read_text())
  attrs["vae_fingerprint"] = "0" * 64
  attrs_path.write_text(json.dumps(attrs))
  report = latent_cache.check_cache(copy, config, dataset_lib.list_videos(config.data.dataset_dir))
  assert report.missing == ["sample_0001"] and report.mismatched[0].startswith("sample_0002: entry has vae_fingerprint")


def test_trainer_stops_at_start_when_the_cache_has_other_vae_weights(built, tmp_path):
  from v2w_jax.training import trainer  # pylint: disable=import-outside-toplevel

  config, cache_dir, _ = built
  config = _config(config.data.dataset_dir, cache_dir)
  config.seed = 7  # another random VAE
  config.job.output_root = str(tmp_path)
  with pytest.raises(latent_cache.LatentCacheError, match="other VAE weights") as err:
    trainer.train(config)
  assert isinstance(err.value, dataset_lib.DataError)  # printed as one `error:` line by v2w_jax.train
  assert not (trainer.job_dir(config) / "checkpoints").exists()


def test_check_cli_reports_the_cache(built, tmp_path, repo_root):
  config, cache_dir, _ = built
  copy = tmp_path / "cache"
  shutil.copytree(cache_dir, copy)
  shutil.rmtree(copy / "clips" / "sample_0000")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  runs = {}
  for name, folder in (("full", cache_dir), ("partial", copy)):
    runs[name] = subprocess.run(
        [sys.executable, "-m", "v2w_jax.data.check", config.data.dataset_dir, "--config=configs/tiny.py",
         f"--config.data.latent_cache.dir={folder}"], cwd=repo_root, capture_output=True, text=True, env=env,
        timeout=300)
  assert runs["full"].returncode == 0, runs["full"].stdout + runs["full"].stderr
  assert "3 of 3 clips cached (9 windows), 0 missing, 0 mismatched" in runs["full"].stdout
  assert runs["partial"].returncode == 1
  assert "2 of 3 clips cached (6 windows), 1 missing" in runs["partial"].stdout
  assert "MISSING sample_0000" in runs["partial"].stdout


# ---- the trainer -------------------------------------------------------------------------------


@pytest.mark.slow
def test_trainer_loss_on_cached_latents_equals_the_online_run(tmp_path, monkeypatch):
  """Clips of exactly one window: the online draw and the cache hold the same window. The cached
  run never encodes (the VAE's encoder is disabled) and still decodes its training samples."""
  from v2w_jax.models import vae as vae_lib  # pylint: disable=import-outside-toplevel
  from v2w_jax.training import trainer  # pylint: disable=import-outside-toplevel

  monkeypatch.delenv("V2W_OUTPUT_ROOT", raising=False)
  config = _config(tmp_path / "data", windows=1)
  sd.make_sample_dataset(config.data.dataset_dir, sd.spec_for_config(config, num_videos=4, frames=9))
  _build(config, tmp_path / "cache")

  def run(name, cache="", sample_iter=0):
    c = _config(config.data.dataset_dir, cache, windows=1)
    c.data.global_batch_size = 1  # one clip per device, as the recipe (see the test above)
    c.job.output_root = str(tmp_path / name)
    c.trainer.update(max_iter=3, logging_iter=1, save_iter=100, run_validation=False, sample_iter=sample_iter,
                     sample_num_steps=1)
    c.checkpoint.async_save = False
    summary = trainer.train(c)
    rows = [json.loads(line) for line in (pathlib.Path(summary["job_dir"]) / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r], pathlib.Path(summary["job_dir"])

  online, _ = run("online")

  def no_encode(*args, **kwargs):
    raise AssertionError("the VAE encoded in a cached run")

  monkeypatch.setattr(vae_lib, "encode_moments", no_encode)
  cached, job = run("cached", tmp_path / "cache", sample_iter=3)
  assert len(online) == 3 and cached == online
  assert sorted(p.name for p in (job / "samples").iterdir()) == [
      "step_000000003_ema.mp4", "step_000000003_gt.mp4", "step_000000003_reg.mp4"]

"""Clip decoding and the reference resize (v2w_jax.data.video)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from v2w_jax.data import sample_dataset as sd
from v2w_jax.data import video as video_lib


def _test_image(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
  """Smooth structure plus noise plus hard edges: exercises every filter tap."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w]
  base = 127 + 100 * np.sin(xx[None, :, :, None] / 5.0 + yy[None, :, :, None] / 3.0 + np.arange(3))
  img = base + rng.normal(0, 25, (t, h, w, 3))
  img[:, : h // 3, : w // 4] = 255.0
  img[:, -h // 4 :, -w // 3 :] = 0.0
  return np.clip(img, 0, 255).astype(np.uint8)


SIZES = [
    ((72, 96), (32, 48)),  # downscale both axes
    ((45, 80), (32, 48)),  # non-integer factors
    ((30, 40), (64, 50)),  # upscale
    ((64, 96), (64, 40)),  # one axis only
    ((100, 100), (33, 77)),  # mixed
    ((37, 53), (37, 53)),  # identity
]


@pytest.mark.parametrize("src,dst", SIZES)
def test_resize_matches_torch_antialiased_bilinear(src, dst):
  torch = pytest.importorskip("torch")
  frames = _test_image(3, *src)
  ours = video_lib.resize_frames(frames, dst)
  # What torchvision's F.resize(antialias=True) runs for float tensors, then the reference's
  # x255, clamp, .to(uint8).
  x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
  ref = torch.nn.functional.interpolate(x, size=dst, mode="bilinear", antialias=True, align_corners=False)
  ref = (ref * 255).clamp(0, 255).to(torch.uint8).permute(1, 0, 2, 3).numpy()
  assert ours.shape == (3, 3, *dst) and ours.dtype == np.uint8
  diff = np.abs(ours.astype(int) - ref.astype(int))
  assert diff.max() <= 1
  assert (diff > 0).mean() < 0.01  # float32 rounding only, at truncation boundaries


@pytest.mark.parametrize("src,dst", SIZES[:5])
def test_resize_matches_jax_image_resize(src, dst):
  import jax  # pylint: disable=import-outside-toplevel

  frames = _test_image(2, *src, seed=1)
  ours = video_lib.resize_frames(frames, dst)
  x = frames.astype(np.float32) / 255
  ref = jax.image.resize(x, (2, *dst, 3), method="bilinear", antialias=True)
  ref = np.clip(np.asarray(ref) * 255, 0, 255).astype(np.uint8).transpose(3, 0, 1, 2)
  diff = np.abs(ours.astype(int) - ref.astype(int))
  assert diff.max() <= 1
  assert (diff > 0).mean() < 0.05  # jax sums in another order: more values flip at x.999...


def test_resize_truncates_like_uint8_cast():
  # A flat image stays exactly flat for every value (x/255*255 round-trips in float32).
  frames = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None, None, None], (256, 12, 20, 3)).copy()
  out = video_lib.resize_frames(frames, (6, 10))
  np.testing.assert_array_equal(out[:, :, 3, 5].T, np.repeat(np.arange(256)[:, None], 3, 1))


def test_taps_are_normalised_and_local():
  for n_in, n_out in [(720, 704), (1080, 704), (48, 32), (32, 48), (5, 5)]:
    idx, w = video_lib.aa_bilinear_taps(n_in, n_out)
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-6)
    assert idx.min() >= 0 and idx.max() < n_in
    centers = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    mean_pos = (idx * w).sum(1)
    interior = slice(2, n_out - 2)
    np.testing.assert_allclose(mean_pos[interior], centers[interior], atol=0.05)  # no half-pixel shift


def test_window_start_uniform_over_all_valid_positions():
  rng = np.random.default_rng(0)
  total, t = 12, 9
  starts = np.array([video_lib.draw_start(total, t, rng) for _ in range(4000)])
  counts = np.bincount(starts, minlength=total - t + 1)
  assert len(counts) == total - t + 1  # never beyond the last valid start
  assert counts.min() > 0.85 * 1000 and counts.max() < 1.15 * 1000  # the last start is drawn too
  assert video_lib.draw_start(9, 9, rng) == 0  # a clip of exactly num_frames works
  with pytest.raises(ValueError):
    video_lib.draw_start(8, 9, rng)


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
  frames = sd.render_frames(20, 64, 96, seed=3)
  path = tmp_path_factory.mktemp("clips") / "clip.mp4"
  video_lib.write_mp4(path, frames, fps=24)
  return path, frames


def _err(decoded: np.ndarray, frames: np.ndarray) -> float:
  return float(np.abs(decoded.astype(int) - frames.transpose(3, 0, 1, 2).astype(int)).mean())


@pytest.mark.parametrize("backend", ["decord", "pyav", "auto"])
def test_decode_window_content_and_fps(clip_file, backend):
  path, frames = clip_file
  clip = video_lib.decode_clip(path, 9, start=7, backend=backend)
  assert clip.video.shape == (3, 9, 64, 96) and clip.video.dtype == np.uint8
  assert clip.fps == pytest.approx(24.0) and clip.total_frames == 20 and clip.start == 7
  right = _err(clip.video, frames[7:16])
  assert right < 6  # H.264 at qp 12
  assert right < 0.5 * min(_err(clip.video, frames[6:15]), _err(clip.video, frames[8:17]))


def test_decord_and_pyav_agree(clip_file):
  path, _ = clip_file
  a = video_lib.decode_clip(path, 5, start=11, backend="decord").video
  b = video_lib.decode_clip(path, 5, start=11, backend="pyav").video
  assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


def test_decode_random_window_and_resize(clip_file):
  path, frames = clip_file
  clip = video_lib.decode_clip(path, 9, np.random.default_rng(5), size=(32, 48))
  assert clip.video.shape == (3, 9, 32, 48)
  assert 0 <= clip.start <= 11
  expect = video_lib.resize_frames(frames[clip.start : clip.start + 9], (32, 48))
  assert np.abs(clip.video.astype(int) - expect.astype(int)).mean() < 6


def test_exact_length_clip_and_too_short(tmp_path):
  path = tmp_path / "nine.mp4"
  video_lib.write_mp4(path, sd.render_frames(9, 64, 96, seed=1))
  clip = video_lib.decode_clip(path, 9, np.random.default_rng(0))
  assert clip.start == 0 and clip.video.shape[1] == 9
  with pytest.raises(video_lib.VideoError, match=r"nine\.mp4: clip has 9 frames, fewer than the 10"):
    video_lib.decode_clip(path, 10, np.random.default_rng(0))


def test_decord_width_bug_falls_back_to_pyav(tmp_path):
  # decord 0.6 cannot decode some valid widths (48 here); 'auto' must still give the right frames.
  path = tmp_path / "w48.mp4"
  frames = sd.render_frames(10, 32, 48, seed=2)
  video_lib.write_mp4(path, frames)
  clip = video_lib.decode_clip(path, 4, start=3)
  assert clip.video.shape == (3, 4, 32, 48)
  assert _err(clip.video, frames[3:7]) < 8


def test_missing_fps_falls_back_to_16(clip_file, monkeypatch, caplog):
  path, _ = clip_file
  monkeypatch.setattr(video_lib._DecordReader, "fps", lambda self: float("nan"))  # pylint: disable=protected-access
  with caplog.at_level(logging.WARNING):
    clip = video_lib.decode_clip(path, 3, start=0, backend="decord")
  assert clip.fps == 16.0
  assert "no usable frame rate" in caplog.text and str(path) in caplog.text


def test_probe(clip_file):
  path, _ = clip_file
  info = video_lib.probe_video(path)
  assert (info.num_frames, info.height, info.width) == (20, 64, 96)
  assert info.fps == pytest.approx(24.0)

"""Conditional-frame preparation for inference (v2w_jax/inference/conditioning.py).

The resize is checked against torch's antialiased bilinear (an independent implementation), the crop
and frame selection against hand-built inputs whose content identifies each frame.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from v2w_jax.data.video import write_mp4, write_png
from v2w_jax.inference import conditioning as C


def _torch_reference(frames: np.ndarray, size) -> np.ndarray:
  """Independent resize + center crop: torch antialiased bilinear on float/255, x255, truncate."""
  torch = pytest.importorskip("torch")
  th, tw = size
  h, w = frames.shape[1:3]
  scale = max(tw / w, th / h)
  rh, rw = math.ceil(scale * h), math.ceil(scale * w)
  x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
  y = torch.nn.functional.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
  y = (y * 255.0).clamp(0, 255).to(torch.uint8).numpy()  # [T, 3, rh, rw]
  top, left = int(round((rh - th) / 2.0)), int(round((rw - tw) / 2.0))
  return y[:, :, top:top + th, left:left + tw].transpose(1, 0, 2, 3)


def test_resize_shape_and_crop_offsets():
  # scale = max(48/64, 32/40) = 0.8 -> (32, ceil(51.2) = 52); crop left round(4 / 2) = 2.
  assert C.resize_shape(40, 64, (32, 48)) == (32, 52)
  assert C.center_crop_offsets(32, 52, (32, 48)) == (0, 2)
  # Portrait input into landscape target: width decides, height overflows.
  assert C.resize_shape(100, 50, (32, 48)) == (96, 48)
  assert C.center_crop_offsets(96, 48, (32, 48)) == (32, 0)
  # Upscaling: scale = max(1280/640, 704/360) = 2 -> (720, 1280), crop top 8.
  assert C.resize_shape(360, 640, (704, 1280)) == (720, 1280)
  assert C.center_crop_offsets(720, 1280, (704, 1280)) == (8, 0)
  # torchvision rounds half to even: (35 - 32) / 2 = 1.5 -> 2, (33 - 32) / 2 = 0.5 -> 0.
  assert C.center_crop_offsets(35, 48, (32, 48)) == (2, 0)
  assert C.center_crop_offsets(33, 48, (32, 48)) == (0, 0)
  with pytest.raises(ValueError, match="larger than the frame"):
    C.center_crop_offsets(30, 48, (32, 48))


def test_crop_only_is_exact():
  rng = np.random.default_rng(0)
  frames = rng.integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)  # scale 1: no resampling
  out = C.resize_and_crop(frames, (32, 48))
  np.testing.assert_array_equal(out, frames[:, 4:36].transpose(3, 0, 1, 2))


@pytest.mark.parametrize("hw", [(40, 64), (100, 50), (18, 30), (33, 48)])
def test_resize_and_crop_matches_torch(hw):
  rng = np.random.default_rng(1)
  frames = rng.integers(0, 256, (2, *hw, 3), dtype=np.uint8)
  frames[:, : hw[0] // 2] //= 3  # some structure so a misplaced crop shows
  out = C.resize_and_crop(frames, (32, 48))
  ref = _torch_reference(frames, (32, 48))
  assert out.shape == (3, 2, 32, 48) and out.dtype == np.uint8
  assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1


def test_image_gives_one_frame(tmp_path):
  rng = np.random.default_rng(2)
  img = rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)
  write_png(tmp_path / "a.png", img)
  out = C.conditional_frames(tmp_path / "a.png", 1, (32, 48))
  assert out.shape == (3, 1, 32, 48)
  np.testing.assert_array_equal(out, C.resize_and_crop(img[None], (32, 48)))  # PNG is lossless
  with pytest.raises(C.InputError, match="exactly 1 conditional frame"):
    C.conditional_frames(tmp_path / "a.png", 2, (32, 48))
  full = C.reference_input_video(out, 9, (32, 48), pad="black")
  assert full.shape == (3, 9, 32, 48) and (full[:, 1:] == 0).all()
  np.testing.assert_array_equal(full[:, :1], out)


def test_video_gives_last_frames(tmp_path):
  # 12 flat frames; frame i has grey level 20 i, so each decoded frame says which one it is.
  levels = 20 * np.arange(12)
  frames = np.broadcast_to(levels[:, None, None, None], (12, 32, 48, 3)).astype(np.uint8)
  write_mp4(tmp_path / "v.mp4", np.ascontiguousarray(frames), 16)
  two = C.conditional_frames(tmp_path / "v.mp4", 2, (32, 48))
  assert two.shape == (3, 5, 32, 48)
  np.testing.assert_allclose(two.reshape(3, 5, -1).mean(axis=(0, 2)), levels[7:], atol=3)
  one = C.conditional_frames(tmp_path / "v.mp4", 1, (32, 48))
  assert one.shape == (3, 1, 32, 48)
  np.testing.assert_allclose(one.mean(), levels[-1], atol=3)
  full = C.reference_input_video(two, 9, (32, 48), pad="last")
  np.testing.assert_array_equal(full[:, 5:], np.repeat(two[:, -1:], 4, axis=1))
  write_mp4(tmp_path / "short.mp4", np.ascontiguousarray(frames[:3]), 16)
  with pytest.raises(C.InputError, match=r"short\.mp4.*3 frame\(s\), fewer than the 5"):
    C.conditional_frames(tmp_path / "short.mp4", 2, (32, 48))


def test_bad_inputs(tmp_path):
  with pytest.raises(C.InputError, match="does not exist"):
    C.conditional_frames(tmp_path / "nope.png", 1, (32, 48))
  (tmp_path / "junk.png").write_bytes(b"not a png")
  with pytest.raises(C.InputError, match="junk.png: cannot decode"):
    C.conditional_frames(tmp_path / "junk.png", 1, (32, 48))
  with pytest.raises(ValueError, match="1 or 2"):
    C.conditional_frames(tmp_path / "junk.png", 0, (32, 48))
  assert [C.pixel_frames_for(n) for n in (0, 1, 2, 3)] == [0, 1, 5, 9]
  assert C.reference_input_video(None, 5, (16, 16)).sum() == 0

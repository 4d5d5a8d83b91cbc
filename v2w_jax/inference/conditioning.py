"""Conditional frames for Video2World inference, prepared as the reference inference script does.

Reference (``training_spec.md`` §3, ``Video2WorldInference.generate_vid2world``):

* image2world, N = 1 latent frame: the image is pixel frame 0 (the other frames are black);
* video2world, N = 2: the **last** 1 + 4 (N - 1) = 5 frames of the input video (N = 1: its last frame),
  padded to the clip length with the last frame;
* text2world, N = 0: an all-black clip;
* every frame is resized preserving the aspect ratio with scale = max(tw / w, th / h) to
  (ceil(scale h), ceil(scale w)), then center-cropped to (th, tw).

Because the VAE encoder is causal, latent frames [0, N) depend only on pixel frames [0, 1 + 4 (N - 1)),
so only those frames are read, resized and encoded; the padding frames never influence the output
(the sampler uses the clean latents only on conditional frames). :func:`reference_input_video` builds
the reference's full padded clip for tests and tools.

Resizing reuses the training pipeline's antialiased bilinear (``data/video.py``: float/255, resize,
x255, truncate); the reference's uint8 torchvision path rounds instead, so frames may differ by one
uint8 level.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

from v2w_jax.data import video as video_lib
from v2w_jax.inference.spec import input_kind
from v2w_jax.user_errors import UserError


class InputError(UserError, ValueError):
  """An input image / video cannot be used; the message names the file."""


def pixel_frames_for(num_conditional_frames: int, temporal_factor: int = 4) -> int:
  """Pixel frames behind N conditional latent frames: 1 + 4 (N - 1) (0 for N = 0)."""
  if num_conditional_frames < 0:
    raise ValueError(f"num_conditional_frames must be >= 0, got {num_conditional_frames}")
  return 0 if num_conditional_frames == 0 else 1 + temporal_factor * (num_conditional_frames - 1)


def resize_shape(height: int, width: int, size: Sequence[int]) -> tuple[int, int]:
  """The reference's aspect-preserving resize target: scale = max(tw/w, th/h), ceil of each side."""
  th, tw = (int(s) for s in size)
  scale = max(tw / width, th / height)
  return int(math.ceil(scale * height)), int(math.ceil(scale * width))


def center_crop_offsets(height: int, width: int, size: Sequence[int]) -> tuple[int, int]:
  """(top, left) of torchvision's ``center_crop``: round((H - th) / 2), round((W - tw) / 2)."""
  th, tw = (int(s) for s in size)
  if th > height or tw > width:
    raise ValueError(f"crop {th}x{tw} larger than the frame {height}x{width}")
  return int(round((height - th) / 2.0)), int(round((width - tw) / 2.0))


def resize_and_crop(frames: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """uint8 frames [T, H, W, 3] -> uint8 [3, T, th, tw]: aspect-preserving resize, then center crop."""
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.shape} {frames.dtype}")
  th, tw = (int(s) for s in size)
  rh, rw = resize_shape(frames.shape[1], frames.shape[2], (th, tw))
  resized = video_lib.resize_frames(frames, (rh, rw))  # [3, T, rh, rw]
  top, left = center_crop_offsets(rh, rw, (th, tw))
  return np.ascontiguousarray(resized[:, :, top:top + th, left:left + tw])


def read_image(path: str | os.PathLike) -> np.ndarray:
  """An image file as uint8 RGB [H, W, 3] (decoded with PyAV: png, jpeg, webp, bmp)."""
  import av  # pylint: disable=import-outside-toplevel

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise InputError(f"{path}: image file does not exist")
  try:
    with av.open(path) as container:
      frame = next(container.decode(video=0))
      return frame.to_ndarray(format="rgb24")
  except StopIteration as e:
    raise InputError(f"{path}: no image in the file") from e
  except Exception as e:  # av raises many error types
    raise InputError(f"{path}: cannot decode the image ({type(e).__name__}: {e})") from e


def read_video_tail(path: str | os.PathLike, num_frames: int) -> np.ndarray:
  """The last ``num_frames`` frames of a video as uint8 RGB [num_frames, H, W, 3]."""
  path = os.fspath(path)
  errors = []
  for backend in ("auto", "pyav"):  # decord first when installed; PyAV if decord fails on this file
    try:
      reader = video_lib.open_reader(path, backend=backend)
      total = int(reader.total)
      if total < num_frames:
        raise InputError(f"{path}: the video has {total} frame(s), fewer than the {num_frames} that "
                         f"{'2 conditional latent frames need' if num_frames > 1 else 'are needed'}")
      return reader.read(total - num_frames, num_frames)
    except video_lib.VideoError as e:
      errors.append(str(e))
  # PyAV's own message is part of the first one when decord could not open the file: say it once.
  raise InputError(errors[0] if all(e in errors[0] for e in errors[1:]) else "; ".join(errors))


def conditional_frames(input_path: str | os.PathLike, num_conditional_frames: int, size: Sequence[int],
                       temporal_factor: int = 4) -> np.ndarray:
  """The pixel frames behind N conditional latent frames, resized and cropped: uint8 [3, 1 + 4 (N-1), th, tw].

  An image gives N = 1 only; a video gives its last 1 + 4 (N - 1) frames.
  """
  if num_conditional_frames not in (1, 2):
    raise ValueError(f"num_conditional_frames must be 1 or 2 for an input file, got {num_conditional_frames}")
  kind = input_kind(input_path)
  if kind == "image":
    if num_conditional_frames != 1:
      raise InputError(f"{input_path}: an image gives exactly 1 conditional frame, "
                       f"{num_conditional_frames} requested")
    frames = read_image(input_path)[None]
  elif kind == "video":
    frames = read_video_tail(input_path, pixel_frames_for(num_conditional_frames, temporal_factor))
  else:
    raise InputError(f"{input_path}: unsupported file type (not an image or video extension)")
  return resize_and_crop(frames, size)


def reference_input_video(cond_frames: np.ndarray | None, num_frames: int, size: Sequence[int],
                          pad: str = "last") -> np.ndarray:
  """The reference's full input clip uint8 [3, T, th, tw]: conditional frames, then padding.

  ``pad="last"`` repeats the last conditional frame (video input), ``"black"`` fills zeros (image input);
  ``cond_frames`` None gives the all-black text2world clip.
  """
  th, tw = (int(s) for s in size)
  out = np.zeros((3, num_frames, th, tw), np.uint8)
  if cond_frames is None:
    return out
  n = cond_frames.shape[1]
  out[:, :n] = cond_frames
  if pad == "last":
    out[:, n:] = cond_frames[:, -1:]
  elif pad != "black":
    raise ValueError(f"pad must be 'last' or 'black', got {pad!r}")
  return out

"""Video2World conditioning: conditional-frame counts, mask channel, image batches, caption dropout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import nemo
from v2w_jax.diffusion import conditioning as C


def test_conditional_frame_probabilities_spec_number_18():
  n = np.asarray(C.draw_num_conditional_frames(jax.random.key(0), 100_000, 24, (0.5, 0.25, 0.25)))
  freq = np.bincount(n, minlength=3) / n.size
  np.testing.assert_allclose(freq, [0.5, 0.25, 0.25], atol=0.006)
  assert abs(n.mean() - 0.75) < 0.01
  assert n.dtype == np.int32


def test_other_probabilities_and_index_meaning():
  n = np.asarray(C.draw_num_conditional_frames(jax.random.key(1), 50_000, 8, (0.0, 0.0, 0.0, 1.0)))
  assert np.all(n == 3)
  n = np.asarray(C.draw_num_conditional_frames(jax.random.key(1), 50_000, 8, (0.1, 0.0, 0.9)))
  assert set(np.unique(n)) == {0, 2} and abs(np.mean(n == 0) - 0.1) < 0.006


def test_forced_counts_and_clipping():
  forced = jnp.asarray([-1, 0, 2, 1, 7, -1], jnp.int32)
  n = np.asarray(C.draw_num_conditional_frames(jax.random.key(2), 6, 4, (0.0, 1.0), forced))
  np.testing.assert_array_equal(n, [1, 0, 2, 1, 4, 1])  # -1 drawn (always 1 here), 7 clipped to T = 4


def test_image_batch_has_no_conditional_frames():
  emb = jnp.ones((3, 5, 8))
  cond = C.make_condition(jax.random.key(3), emb, (3, 16, 1, 4, 4), conditional_frames_probs=(0.0, 1.0),
                          caption_dropout_rate=0.0, forced_num_conditional_frames=jnp.asarray([1, 1, 1]))
  assert cond.is_image
  assert np.all(np.asarray(cond.num_conditional_frames) == 0)
  assert np.all(np.asarray(cond.input_mask((3, 16, 1, 4, 4))) == 0)


def test_mask_channel():
  n = jnp.asarray([0, 1, 3], jnp.int32)
  m = np.asarray(C.frame_mask(n, 4))
  np.testing.assert_array_equal(m, [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]])
  cond = C.VideoCondition(crossattn_emb=jnp.zeros((3, 1, 1)), num_conditional_frames=n, frame_mask_B_T=jnp.asarray(m),
                          caption_kept=jnp.ones((3,), bool))
  full = cond.input_mask((3, 16, 4, 2, 5))
  assert full.shape == (3, 1, 4, 2, 5) and full.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(full, np.float32), np.broadcast_to(m[:, None, :, None, None], (3, 1, 4, 2, 5)))
  assert not cond.is_image


def test_caption_dropout():
  b = 20_000
  emb = jax.random.normal(jax.random.key(4), (b, 2, 3)).astype(jnp.bfloat16)
  out, kept = C.caption_dropout(jax.random.key(5), emb, 0.2)
  out, kept, emb = np.asarray(out, np.float32), np.asarray(kept), np.asarray(emb, np.float32)
  assert out.dtype == np.float32 and abs(1 - kept.mean() - 0.2) < 0.01
  assert np.all(out[~kept] == 0.0)  # a dropped caption is all zeros
  np.testing.assert_array_equal(out[kept], emb[kept])
  same, kept0 = C.caption_dropout(jax.random.key(5), jnp.asarray(emb), 0.0)
  assert np.all(np.asarray(kept0)) and np.array_equal(np.asarray(same), emb)


def test_deterministic_from_key():
  emb = jnp.ones((8, 2, 3))
  shape = (8, 16, 6, 2, 2)
  kw = dict(conditional_frames_probs=(0.5, 0.25, 0.25), caption_dropout_rate=0.5)
  a = C.make_condition(jax.random.key(6), emb, shape, **kw)
  b = C.make_condition(jax.random.key(6), emb, shape, **kw)
  c = C.make_condition(jax.random.key(7), emb, shape, **kw)
  assert np.array_equal(np.asarray(a.num_conditional_frames), np.asarray(b.num_conditional_frames))
  assert np.array_equal(np.asarray(a.caption_kept), np.asarray(b.caption_kept))
  assert not (np.array_equal(np.asarray(a.num_conditional_frames), np.asarray(c.num_conditional_frames))
              and np.array_equal(np.asarray(a.caption_kept), np.asarray(c.caption_kept)))


def test_condition_from_nemo_config():
  cfg = nemo.get_config()
  emb = jnp.ones((4000, 1, 2))
  cond = C.condition_from_config(jax.random.key(8), cfg, emb, (4000, 16, 24, 1, 1))
  assert abs(float(jnp.mean(cond.num_conditional_frames)) - 0.75) < 0.05
  assert abs(1 - float(jnp.mean(cond.caption_kept)) - 0.2) < 0.03
  np.testing.assert_array_equal(np.asarray(cond.frame_mask_B_T.sum(1)), np.asarray(cond.num_conditional_frames))


@pytest.mark.parametrize("probs", [(), (0.5, 0.6), (-0.1, 1.1)])
def test_bad_probabilities(probs):
  with pytest.raises(ValueError, match="conditional_frames_probs"):
    C.draw_num_conditional_frames(jax.random.key(0), 2, 4, probs)

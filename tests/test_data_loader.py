"""The grain loader: batch format, determinism, per-epoch reshuffle, process sharding, resume."""

from __future__ import annotations

import numpy as np
import pytest

from configs import tiny
from v2w_jax.data import dataset as dataset_lib
from v2w_jax.data import sample_dataset as sd
from v2w_jax.data import text as text_lib

NUM_VIDEOS = 5


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  c = tiny.get_config()
  c.data.dataset_dir = str(tmp_path_factory.mktemp("loader") / "sample")
  sd.make_sample_dataset(
      c.data.dataset_dir,
      sd.spec_for_config(c, num_videos=NUM_VIDEOS, frames=16, captions=("a teal robot", "a red robot")),
  )
  return c


def _loader(config, **kw):
  kw.setdefault("process_index", 0)
  kw.setdefault("process_count", 1)
  return dataset_lib.make_loader(config, **kw)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]), err_msg=k)


def test_batch_format(config):
  it = _loader(config)
  batch = next(it)
  b, t, (h, w) = config.data.global_batch_size, config.data.num_frames, config.data.video_size
  n, d = config.data.text_tokens, config.model.crossattn_proj_in_channels
  assert set(batch) == {"video", "text_embeddings", "padding_mask", "fps", "index"}
  assert batch["video"].shape == (b, 3, t, h, w) and batch["video"].dtype == np.uint8
  assert batch["text_embeddings"].shape == (b, n, d) and batch["text_embeddings"].dtype == text_lib.BF16
  assert batch["padding_mask"].shape == (b, 1, h, w) and batch["padding_mask"].dtype == np.float32
  assert not batch["padding_mask"].any()
  assert batch["fps"].dtype == np.float32 and np.all(batch["fps"] == 16.0)
  assert batch["index"].dtype == np.int32
  # Each sample carries its own caption's embedding.
  store = text_lib.TextEmbeddingStore(text_lib.default_store_dir(config.data.dataset_dir))
  videos = dataset_lib.list_videos(config.data.dataset_dir)
  for i, idx in enumerate(batch["index"]):
    want = store.load(dataset_lib.read_caption(videos[idx]))
    np.testing.assert_array_equal(batch["text_embeddings"][i].view(np.uint16), want.view(np.uint16))


def test_deterministic_for_a_seed(config):
  _assert_same(_take(_loader(config, seed=3), 4), _take(_loader(config, seed=3), 4))
  a, b = _take(_loader(config, seed=3), 4), _take(_loader(config, seed=4), 4)
  assert any(not np.array_equal(x["video"], y["video"]) for x, y in zip(a, b))


def test_every_epoch_is_a_new_permutation_and_windows_vary(config):
  c = config.copy_and_resolve_references()
  c.data.global_batch_size = 1
  it = _loader(c, seed=0)
  batches = _take(it, NUM_VIDEOS * 6)
  order = np.array([b["index"][0] for b in batches]).reshape(6, NUM_VIDEOS)
  for epoch in order:
    assert sorted(epoch) == list(range(NUM_VIDEOS))  # each epoch visits every clip once
  assert len({tuple(e) for e in order}) > 1  # reshuffled (the reference repeats epoch 0)
  # The same clip gets different random windows in different epochs.
  clips = {}
  for b in batches:
    clips.setdefault(int(b["index"][0]), []).append(b["video"][0])
  assert any(len({v.tobytes() for v in vs}) > 1 for vs in clips.values())


def test_processes_get_disjoint_shards_of_one_global_stream(config):
  c = config.copy_and_resolve_references()
  c.data.global_batch_size = 4
  single = _take(_loader(c, seed=1), 4)
  p0 = _take(_loader(c, seed=1, process_index=0, process_count=2), 4)
  p1 = _take(_loader(c, seed=1, process_index=1, process_count=2), 4)
  for s, a, b in zip(single, p0, p1):
    assert a["video"].shape[0] == 2 and b["video"].shape[0] == 2
    # Process 0 holds the first half of every global batch, process 1 the second: concatenated
    # in process order they are the single-process batch, position for position.
    np.testing.assert_array_equal(np.concatenate([a["index"], b["index"]]), s["index"])
    np.testing.assert_array_equal(np.concatenate([a["video"], b["video"]]), s["video"])
  with pytest.raises(dataset_lib.DataError, match="not divisible"):
    _loader(c, process_index=0, process_count=3)


def test_resume_from_state_continues_at_the_next_batch(config):
  it = _loader(config, seed=7)
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 4)
  resumed = _loader(config, seed=7, start_state=state)
  _assert_same(_take(resumed, 4), expected)
  fresh = _loader(config, seed=7)
  fresh.set_state(state)
  _assert_same(_take(fresh, 4), expected)


def test_resume_through_orbax_with_the_grain_handler(config, tmp_path):
  grain = pytest.importorskip("grain")
  ocp = pytest.importorskip("orbax.checkpoint")
  it = _loader(config, seed=11)
  _take(it, 2)
  mngr = ocp.CheckpointManager(
      tmp_path / "ckpt", item_names=("data",), item_handlers={"data": grain.checkpoint.CheckpointHandler()}
  )
  mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  expected = _take(it, 3)
  fresh = _loader(config, seed=11)
  mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  _assert_same(_take(fresh, 3), expected)
  mngr.close()


def test_worker_processes_give_the_same_stream_and_resume(config):
  c = config.copy_and_resolve_references()
  c.data.num_workers = 2
  inline = _take(_loader(config, seed=5), 5)
  it = _loader(c, seed=5)
  try:
    first = _take(it, 2)
    state = it.get_state()
    rest = _take(it, 3)
  finally:
    it.close()
  _assert_same(first + rest, inline)
  resumed = _loader(c, seed=5, start_state=state)
  try:
    _assert_same(_take(resumed, 3), rest)
  finally:
    resumed.close()


def test_global_batch_assembly(config):
  import jax  # pylint: disable=import-outside-toplevel
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel

  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
  sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  local = next(_loader(config, seed=2))
  glob = next(_loader(config, seed=2, sharding=sharding))
  for k, v in local.items():
    assert isinstance(glob[k], jax.Array) and glob[k].sharding == sharding
    np.testing.assert_array_equal(np.asarray(glob[k]), v)


def test_validation_split(config):
  c = config.copy_and_resolve_references()
  c.data.val_dataset_dir = ""
  with pytest.raises(dataset_lib.DataError, match="val_dataset_dir"):
    _loader(c, split="val")
  c.data.val_dataset_dir = c.data.dataset_dir
  assert next(_loader(c, split="val"))["video"].shape[0] == c.data.global_batch_size

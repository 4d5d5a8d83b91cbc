"""A toy config with the structure of ``configs/nemo.py``: trains on CPU in a minute or two.

Used by the README's quick start and the tests. The sample dataset is written on first use into
its own folder ``data.sample_dataset_dir`` (``data/sample_dataset``; no downloads): synthetic
moving-pattern mp4 clips, one caption, and its text embedding from a small deterministic encoder
(see ``tools/make_sample_dataset.py``).

Run::

    python -m v2w_jax.train --config=configs/tiny.py
"""

from configs import nemo


def get_config():
  c = nemo.get_config()
  c.job.name = "tiny"
  c.model.update(
      dict(
          model_channels=64,
          num_heads=4,
          num_blocks=2,
          adaln_lora_dim=16,
          crossattn_emb_channels=32,
          crossattn_proj_in_channels=48,
          param_dtype="float32",
          dtype="float32",
          remat_policy="none",
      )
  )
  c.vae.update(dict(base_dim=8, checkpoint_path=""))
  c.data.update(
      dict(
          # Train and validate on the sample dataset, made in sample_dataset_dir on first use. With
          # --config.data.dataset_dir=YOUR_DATASET the run reads your folder and never writes to it.
          dataset_dir="data/sample_dataset",
          val_dataset_dir="data/sample_dataset",
          sample_dataset_dir="data/sample_dataset",
          make_sample_dataset=True,
          num_frames=9,
          video_size=(32, 48),
          global_batch_size=2,
          num_workers=0,
          text_tokens=16,
      )
  )
  c.optim.lr = 1e-3
  c.schedule.update(dict(warm_up_steps=(5,), cycle_lengths=(1000,), f_start=(0.1,), f_max=(1.0,), f_min=(0.5,)))
  c.trainer.update(
      dict(
          max_iter=40,
          logging_iter=5,
          save_iter=20,
          validation_iter=20,
          run_validation=True,
          sample_iter=40,
          sample_num_steps=4,
      )
  )
  c.checkpoint.keep = 2
  c.wandb.mode = "disabled"
  return c

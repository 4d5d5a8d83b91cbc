"""The Cosmos-NeMo-Assets post-training recipe on the 14B Video2World DiT.

The parent checkpoint is ``nvidia/Cosmos-Predict2.5-14B: base/pre-trained/
54937b8c-29de-4f04-862c-e67b04ec41e8_ema_bf16.pt``, registered in the reference's
``cosmos_predict2/_src/imaginaire/utils/checkpoint_db.py`` with the experiment
``Stage-c_pt_4-reason_embeddings-v1p1-Index-43-Size-14B-Res-720-Fps-16_resume_from_reason1p1_rectified_flow_shift5_high_sigma``.
The reference builds its 2B post-training recipe as "that checkpoint's experiment + the nemo overrides"
(``cosmos_predict2/experiments/base/cosmos_nemo_assets.py``); this file is the same construction on
the 14B experiment.

How the reference resolves the 14B net (``MinimalV1LVGDiT``), paths under
``cosmos_predict2/_src/predict2/``:

* ``configs/video2world/defaults/net.py``, ``COSMOS_V1_14B_NET_MININET`` (net group ``cosmos_v1_14B``):
  a copy of the 7B net with **model_channels 5120, num_heads 40 (head_dim 128), num_blocks 36**,
  extra_per_block_abs_pos_emb False, rope_t_extrapolation_ratio 1.0. Inherited from the 7B net:
  max_img_h/w 240, max_frames 128, in/out_channels 16, patch 2 x 1, concat_padding_mask True,
  pos_emb_cls rope3d, use_adaln_lora True, adaln_lora_dim 256, atten_backend minimal_a2a; mlp_ratio
  is the constructor default 4.0 (``networks/minimal_v4_dit.py``).
* ``configs/video2world/experiment/reason_embeddings/model_14b_reason_1p1_rectified_flow.py``: the
  checkpoint's experiment (``..._SHIFT5_HIGH_SIGMA``) inherits ``..._SHIFT5`` of the same file, whose
  ``model.config.net`` sets rope_enable_fps_modulation False, rope_h/w_extrapolation_ratio 3.0,
  rope_t_extrapolation_ratio 24/24 = 1.0, timestep_scale 0.001, use_crossattn_projection True,
  crossattn_proj_in_channels 100352, crossattn_emb_channels 1024, use_wan_fp32_strategy True and
  sac_config mode ``predict2_14b_720_aggressive``. (The experiments of ``model_14b_reason_1p1.py`` are
  the EDM runs before it; the checkpoint's chain does not include them.)
* ``networks/minimal_v1_lvg_dit.py``: +1 input channel for the condition mask (as for the 2B).

So the 14B differs from the 2B net only in model_channels, num_heads and num_blocks; every other
kwarg resolves to the 2B's value. ``sac_config`` (the reference's activation checkpointing: it keeps
3 of each block's 16 matmul outputs and recomputes the rest, attention included) maps to the port's
``remat_policy``; ``full`` is the default here (recompute each block; 720p residuals of 36 blocks x
84,480 tokens x 5120 channels are 29 GiB per clip even so).

Recipe: the model-config values the 14B experiment sets equal the 2B parent's (shift 5, logit-normal
time, conditional frames 0/1/2 with 0.5/0.25/0.25, text dropout 0.2, Wan2.1 VAE with temporal window
16, power EMA s = 0.1, clip 0.1, AdamW betas 0.9/0.999) except **use_high_sigma_strategy=True** (the
``_high_sigma`` experiment; 5% of samples get tau in [980, 1000]), which the nemo overrides leave in
place and is therefore kept. The nemo overrides replace the 14B experiment's optimizer, schedule,
trainer and data settings exactly as they do the 2B's (lr 2^-14.5, weight decay 0.001, LambdaLinear
0.5/0.2 with 2000 warm-up steps over 100000, 1000 iterations, checkpoint every 200, 93 frames at
704x1280, batch 1, context_parallel_size 1), so those are the values of ``configs/nemo.py``. The 14B
experiment's distribution settings (fsdp_shard_size 32, context_parallel_size 8) are not recipe: the
mesh below decides them.

Mesh: FSDP over all devices; model-channel weights are sharded over ``fsdp`` **and** ``context``, so
adding context parallelism also divides the parameters, gradients and optimizer state (with context 1
this is the default layout). Memory per GPU for each job: README, "The 14B model".

Run (8 GPUs, FSDP 4 x context 2)::

    python -m v2w_jax.train --config=configs/nemo_14b.py --config.mesh.context=2 \
        --config.data.global_batch_size=4 \
        --config.data.dataset_dir=datasets/cosmos_nemo_assets \
        --config.checkpoint.load_path=checkpoints/54937b8c-29de-4f04-862c-e67b04ec41e8_ema_bf16.pt \
        --config.vae.checkpoint_path=checkpoints/Wan2.1_VAE.pth
"""

from ml_collections import ConfigDict

from configs import nemo
from v2w_jax.parallel import rules as R

# The only kwargs in which the reference's cosmos_v1_14B net differs from cosmos_v1_2B.
SIZES_14B = dict(model_channels=5120, num_heads=40, num_blocks=36)


def model_14b() -> ConfigDict:
  """The 14B MinimalV1LVGDiT: the 2B net's kwargs with the 14B sizes."""
  model = nemo.model_2b()
  model.update(SIZES_14B)
  model.remat_policy = "full"
  return model


def params_over_fsdp_and_context(rules) -> tuple:
  """``rules`` with the weight axes FSDP shards (embed, text_in) sharded over fsdp x context."""
  wide = {R.EMBED, R.TEXT_IN}
  return tuple((name, ("fsdp", "context")) if name in wide else (name, axes) for name, axes in rules)


def get_config() -> ConfigDict:
  c = nemo.get_config()
  c.job.name = "14b_cosmos_nemo_assets"
  c.model = model_14b()
  c.objective.rectified_flow.use_high_sigma_strategy = True
  c.mesh.rules = params_over_fsdp_and_context(c.mesh.rules)
  return c

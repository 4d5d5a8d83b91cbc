"""The Cosmos-NeMo-Assets post-training recipe, resolved.

JAX equivalent of the reference's
``experiment=predict2_video2world_training_2b_cosmos_nemo_assets``: the 2B Video2World DiT
(MinimalV1LVGDiT), rectified-flow objective, 0/1/2 conditional latent frames with probabilities
0.5/0.25/0.25, AdamW (lr 2^-14.5, betas 0.9/0.999, wd 0.001), LambdaLinear schedule, power EMA
(s = 0.1), 93 frames at 704x1280, batch 1, 1000 iterations, a checkpoint every 200.
Values come from ``reference/training_spec.md`` §1, §7-§10.

Run::

    python -m v2w_jax.train --config=configs/nemo.py \
        --config.data.dataset_dir=datasets/cosmos_nemo_assets \
        --config.checkpoint.load_path=checkpoints/d20b7120-df3e-4911-919d-db6e08bad31c_ema_bf16.pt \
        --config.vae.checkpoint_path=checkpoints/Wan2.1_VAE.pth
"""

from ml_collections import ConfigDict

from v2w_jax.parallel.rules import DEFAULT_RULES


def model_2b() -> ConfigDict:
  """The 2B MinimalV1LVGDiT; field names are the reference constructor's kwargs."""
  return ConfigDict(
      dict(
          model_channels=2048,
          num_heads=16,
          num_blocks=28,
          mlp_ratio=4.0,
          in_channels=16,
          out_channels=16,
          patch_spatial=2,
          patch_temporal=1,
          concat_padding_mask=True,
          adaln_lora_dim=256,
          crossattn_emb_channels=1024,
          crossattn_proj_in_channels=100352,
          max_img_h=240,
          max_img_w=240,
          max_frames=128,
          rope_h_extrapolation_ratio=3.0,
          rope_w_extrapolation_ratio=3.0,
          rope_t_extrapolation_ratio=1.0,
          timestep_scale=0.001,
          # Port options (not reference kwargs).
          rope_bf16_exponents=True,  # what the real bf16 reference net computes (dit_spec §4.5)
          param_dtype="float32",  # master weights; "bfloat16" with optim.precision=reference_bf16
          dtype="bfloat16",  # compute dtype outside the fp32 islands (dit_spec §8)
          attention_backend="auto",  # auto | fa3 | cudnn | xla  (auto: cudnn on GPU, xla elsewhere; fa3 opt-in)
          # none | save_attention | save_self_attention | save_dots (short clips) | full | offload_attention
          remat_policy="save_attention",
          scan_blocks=True,  # lax.scan over blocks: compile time independent of depth
      )
  )


def get_config() -> ConfigDict:
  c = ConfigDict()
  c.seed = 0

  c.job = ConfigDict(
      dict(
          output_root="outputs",  # overridden by $V2W_OUTPUT_ROOT when set
          project="cosmos_predict_v2p5",
          group="video2world",
          name="2b_cosmos_nemo_assets",
      )
  )

  c.model = model_2b()

  c.vae = ConfigDict(
      dict(
          checkpoint_path="",  # Wan2.1_VAE.pth or a converted orbax folder; "" = random (tests only)
          base_dim=96,
          z_dim=16,
          dtype="bfloat16",
          temporal_window=16,  # pixel frames per encoder chunk after the first (reference value)
      )
  )

  # Diffusion objective: "rectified_flow" (what the recipe runs) or "edm" (configs/nemo_edm.py).
  c.objective = ConfigDict(
      dict(
          name="rectified_flow",
          loss_reduce="mean",  # mean (reference: conditional frames in the denominator) | masked_mean
          rectified_flow=ConfigDict(
              dict(
                  shift=5.0,
                  num_train_timesteps=1000,
                  train_time_distribution="logitnormal",
                  use_high_sigma_strategy=False,
                  high_sigma_ratio=0.05,
                  high_sigma_timesteps_min=980.0,
                  high_sigma_timesteps_max=1000.0,
              )
          ),
          edm=ConfigDict(
              dict(
                  p_mean=0.0,
                  p_std=1.0,
                  sigma_max=80.0,
                  sigma_min=0.0002,
                  sigma_data=0.5,
                  scaling="edm",  # edm | rectified_flow
                  loss_scale=10.0,
                  adjust_video_noise=True,
                  high_sigma_strategy="uniform80_2000",
                  high_sigma_ratio=0.05,
                  sigma_conditional=1e-4,
              )
          ),
      )
  )

  c.conditioning = ConfigDict(
      dict(
          # P(n conditional latent frames) for n = 0, 1, 2, ... (reference {0: .5, 1: .25, 2: .25}).
          conditional_frames_probs=(0.5, 0.25, 0.25),
          conditional_frame_timestep=-1.0,  # < 0: conditional frames share the noisy timestep
          caption_dropout=0.2,  # dropped caption -> all-zero text embedding
      )
  )

  c.optim = ConfigDict(
      dict(
          lr=2.0**-14.5,  # 4.315837287515549e-05
          b1=0.9,
          b2=0.999,
          eps=1e-8,
          weight_decay=0.001,
          weight_decay_filter="all",  # all (reference) | matrices (ndim >= 2 only)
          clip_grad_norm=0.1,
          grad_accum_steps=1,
          precision="fp32_master",  # fp32_master | reference_bf16 (bf16 params and Adam state)
      )
  )

  c.schedule = ConfigDict(
      dict(
          name="lambda_linear",
          warm_up_steps=(2000,),
          cycle_lengths=(100000,),
          f_start=(1e-6,),
          f_max=(0.5,),
          f_min=(0.2,),
      )
  )

  c.ema = ConfigDict(
      dict(
          enabled=True,
          rate=0.1,
          iteration_shift=0,
          offload=False,  # keep the fp32 EMA in pinned host memory (-4 bytes/param of device memory)
          offload_update="in_step",  # in_step | separate (the update as a program of its own)
          every_n_steps=1,  # >1: update after every N-th step with the window's decay (approximate)
      )
  )

  # LoRA post-training (the reference's model.config.use_lora; configs/nemo_lora.py turns it on): adapters
  # on the targeted layers are the only trainable parameters, the base weights stay frozen in base_dtype.
  c.lora = ConfigDict(
      dict(
          rank=0,  # 0 = off (full fine-tune); the reference LoRA uses 32
          alpha=32.0,  # the adapter output is scaled by alpha / rank
          targets="q_proj,k_proj,v_proj,output_proj,mlp.layer1,mlp.layer2",  # peft names, comma-separated
          base_dtype="bfloat16",  # the frozen base weights (no fp32 master copy)
          init_path="",  # adapters to start from (adapters .pt, LoRA .pt, LoRA job checkpoint); "" = fresh
      )
  )

  c.data = ConfigDict(
      dict(
          dataset_dir="datasets/cosmos_nemo_assets",
          embeddings_dir="",  # "" = DATASET/text_embeddings
          val_dataset_dir="",  # "" = no validation loader
          num_frames=93,
          video_size=(704, 1280),
          global_batch_size=1,
          num_workers=4,
          prefetch_buffer_size=2,
          text_tokens=512,
          skip_bad_files=False,
          check_at_start=True,
          # The start-up check also decodes each clip's last frame: a truncated clip whose header still
          # lists all frames is found (and named) once, before training, instead of failing some windows.
          check_decode=True,
          decode_threads=2,
          # Write the synthetic sample dataset (toy runs) into sample_dataset_dir when dataset_dir or
          # val_dataset_dir is that folder. Only ever into that folder, and only if it is new, empty or
          # an earlier sample dataset: a folder of a user's own clips is never written to.
          make_sample_dataset=False,
          sample_dataset_dir="data/sample_dataset",
          # Latents encoded once by tools/cache_latents.py: with `dir` set, training reads them instead of
          # decoding and VAE-encoding a window every iteration ("" = encode online).
          latent_cache=ConfigDict(
              dict(
                  dir="",  # the cache of data.dataset_dir
                  val_dir="",  # the cache of data.val_dataset_dir ("" = validation encodes online)
                  windows_per_clip=4,  # windows cached per clip, starts spread evenly over the clip
              )
          ),
      )
  )

  # Mesh: sizes of (data, fsdp, context); -1 = whatever is left of the devices.
  c.mesh = ConfigDict(dict(data=1, fsdp=-1, context=1, rules=DEFAULT_RULES))

  c.trainer = ConfigDict(
      dict(
          max_iter=1000,
          logging_iter=100,
          save_iter=200,
          validation_iter=100,
          run_validation=False,
          validation_timesteps=(100.0, 500.0, 900.0),
          validation_batches=2,
          sample_iter=200,
          sample_num_steps=35,
          sample_guidance=7.0,
          sample_num_conditional_frames=1,
          dry_run=False,  # compile the step, print its memory per device, exit (no data, no steps)
          memory_check=True,  # stop at start when the compiled step's peak exceeds the device memory
          memory_limit_gib=0.0,  # > 0: check against this many GiB instead (e.g. 80 for an H100 80GB)
      )
  )

  c.checkpoint = ConfigDict(
      dict(
          load_path="",  # reference *.pt, converted DiT folder or another job's checkpoint (its EMA); "" = random
          keep=3,
          async_save=True,
      )
  )

  c.wandb = ConfigDict(dict(mode="offline", entity="", tags=()))
  return c

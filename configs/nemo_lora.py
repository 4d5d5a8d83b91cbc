"""The Cosmos-NeMo-Assets recipe as LoRA post-training, with the reference's LoRA settings.

Same data, objective, optimizer, schedule, EMA and 93x704x1280 clips as ``configs/nemo.py``; as the
reference's ``model.config.use_lora=True``: peft-style adapters of rank 32, alpha 32 on the q/k/v/output
projections of self- and cross-attention and both MLP layers of every block (45.9 M parameters
against the 2.06 B of the base). Only the adapters train (float32, with their own AdamW state and EMA);
the base weights from ``checkpoint.load_path`` stay frozen in bf16.

Memory at 720p: the frozen bf16 base is 3.8 GiB and the adapters' state under 1 GiB, so activations
decide. With ``save_attention`` they measure ~58 GiB (docs/performance.md: the saved attention results
alone are ~38 GiB above ``full``); ``full`` needs ~20 GiB but reruns every attention forward (+2.5 s
per step). ``save_self_attention`` keeps only the self-attention results (~9.5 GiB) and recomputes
the cheap rest (cross-attention has 512 keys), aiming at the full fine-tune's step time within a
45 GiB budget. The adapters' rank-32 intermediates (x·A, 84,480 x 32 per layer) are tiny and are
recomputed with everything else; the base layers' weight gradients are never computed.

Run::

    python -m v2w_jax.train --config=configs/nemo_lora.py \
        --config.data.dataset_dir=datasets/cosmos_nemo_assets \
        --config.checkpoint.load_path=checkpoints/d20b7120-df3e-4911-919d-db6e08bad31c_ema_bf16.pt \
        --config.vae.checkpoint_path=checkpoints/Wan2.1_VAE.pth
"""

from configs import nemo
from v2w_jax.models.lora import REFERENCE_ALPHA, REFERENCE_RANK, REFERENCE_TARGETS


def get_config():
  c = nemo.get_config()
  c.job.name = "2b_cosmos_nemo_assets_lora"
  c.lora.rank = REFERENCE_RANK
  c.lora.alpha = REFERENCE_ALPHA
  c.lora.targets = ",".join(REFERENCE_TARGETS)
  c.model.remat_policy = "save_self_attention"
  return c

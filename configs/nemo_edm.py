"""The Cosmos-NeMo-Assets recipe with the EDM objective the seed design document describes.

Same network, data, optimizer and schedule as ``configs/nemo.py``; the objective is EDM with the
class-default parameterisation (training_spec §2.2 (a)): σ ~ logN(0, 1) scaled by √T for video,
σ_data 0.5, c_skip/c_out/c_in/c_noise preconditioning, EDM loss weights × 10, UNIFORM80_2000
high-σ sampling, σ_conditional 1e-4 on conditional frames, grad clip 1.0. The DiT takes c_noise = ¼ ln σ
as its timestep unscaled (``timestep_scale`` 1.0, as the reference EDM nets; the RF recipe's 0.001 maps
τ in [0, 1000] to [0, 1]). ``python -m v2w_jax.generate`` with this config samples with the EDM 2ab sampler.
"""

from configs import nemo


def get_config():
  c = nemo.get_config()
  c.objective.name = "edm"
  c.model.timestep_scale = 1.0
  c.optim.clip_grad_norm = 1.0
  c.job.name = "2b_cosmos_nemo_assets_edm"
  return c

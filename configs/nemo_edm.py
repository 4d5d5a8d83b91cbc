"""The Cosmos-NeMo-Assets recipe with the EDM objective the seed design document describes.

Same network, data, optimizer and schedule as ``configs/nemo.py``; the objective is EDM with the
class-default parameterisation (training_spec §2.2 (a)): σ ~ logN(0, 1) scaled by √T for video,
σ_data 0.5, c_skip/c_out/c_in/c_noise preconditioning, EDM loss weights × 10, UNIFORM80_2000
high-σ sampling, σ_conditional 1e-4 on conditional frames, grad clip 1.0.
"""

from configs import nemo


def get_config():
  c = nemo.get_config()
  c.objective.name = "edm"
  c.optim.clip_grad_norm = 1.0
  c.job.name = "2b_cosmos_nemo_assets_edm"
  return c

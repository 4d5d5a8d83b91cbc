"""Model FLOPs of one DiT training step, for TFLOP/s and MFU.

The same formula as the reference timing anchor (``reference/perf_anchor_torch_h200.json``), so the
numbers compare directly with the PyTorch trainer. Matmuls count 2 FLOPs per multiply-add; a training
step counts 3x the forward (forward + backward for activations and weights), except 2x for the
layers fed by data (patch embed, text projection, first timestep linear: no input gradient); activation
recomputation (remat) is *not* counted: it is hardware work, not model work.

Forward terms, with L video tokens, N text tokens, D channels, n blocks:

* token-wise block linears: 2·L·P_tok (q, k, v, out of self-attn, q and out of cross-attn, MLP)
* cross-attention k/v projections: 2·N·P_ctx
* self-attention core: 4·L²·D·n (q·kᵀ and p·v)
* cross-attention core: 4·L·N·D·n
* patch embed 2·L·C_in·D, final linear 2·L·D·C_out, text projection 2·N·C_text·C_cross
* AdaLN / timestep MLPs (once per sample with [B,1] timesteps; negligible)

MFU = achieved model FLOP/s ÷ the device's peak dense bf16 FLOP/s (``PEAK_BF16_FLOPS``).
"""

from __future__ import annotations

import dataclasses

# Dense bf16 peak per device, by substring of `device.device_kind`.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "B200": 2250e12,
}


@dataclasses.dataclass(frozen=True)
class StepFlops:
  forward: dict[str, float]

  @property
  def forward_total(self) -> float:
    return float(sum(self.forward.values()))

  @property
  def train_step(self) -> float:
    # Layers whose input is data (not an activation) need no input gradient: 2x, not 3x.
    first_layers = sum(self.forward[k] for k in INPUT_LAYERS)
    return 3.0 * self.forward_total - first_layers


INPUT_LAYERS = ("patch_embed", "crossattn_proj", "t_embedder_linear1")


def dit_flops(model_cfg, latent_thw: tuple[int, int, int], text_tokens: int) -> StepFlops:
  """FLOPs of one sample through the DiT (`model_cfg` has the reference kwargs of configs/nemo.py)."""
  t, h, w = latent_thw
  ps, pt = model_cfg.patch_spatial, model_cfg.patch_temporal
  tokens = (t // pt) * (h // ps) * (w // ps)
  d = model_cfg.model_channels
  n = model_cfg.num_blocks
  cross = model_cfg.crossattn_emb_channels
  hidden = int(d * model_cfg.mlp_ratio)
  lora = model_cfg.adaln_lora_dim
  # Modulation MLPs run once per distinct timestep row: one per sample for [B,1] timesteps.
  rows = 1
  c_in = (model_cfg.in_channels + 1 + int(model_cfg.concat_padding_mask)) * pt * ps * ps
  c_out = model_cfg.out_channels * pt * ps * ps
  # Per block: self-attn q,k,v,out (4·D²), cross-attn q,out (2·D²), MLP (2·D·hidden).
  p_tok = n * (6 * d * d + 2 * d * hidden)
  p_ctx = n * 2 * cross * d
  adaln = rows * 2 * (n * 3 * (d * lora + lora * 3 * d) + (d * lora + lora * 2 * d))
  forward = {
      "block_linear": 2.0 * tokens * p_tok,
      "crossattn_kv": 2.0 * text_tokens * p_ctx,
      "self_attn_core": 4.0 * tokens * tokens * d * n,
      "cross_attn_core": 4.0 * tokens * text_tokens * d * n,
      "patch_embed": 2.0 * tokens * c_in * d,
      "final_linear": 2.0 * tokens * d * c_out,
      "crossattn_proj": 2.0 * text_tokens * model_cfg.crossattn_proj_in_channels * cross,
      "adaln_blocks_final": float(adaln),
      "t_embedder_linear1": 2.0 * rows * d * d,
      "t_embedder_linear2": 2.0 * rows * d * 3 * d,
  }
  return StepFlops(forward)


def peak_flops(device) -> float | None:
  """Peak dense bf16 FLOP/s of a device, or None when unknown (CPU)."""
  kind = getattr(device, "device_kind", "")
  for name, peak in PEAK_BF16_FLOPS.items():
    if name in kind:
      return peak
  return None

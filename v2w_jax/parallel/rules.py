"""Logical axis names used by the model, and the default rules mapping them to mesh axes.

Model code only ever names *logical* axes (``"embed"``, ``"act_length"``...). Which mesh axis
shards each one is configuration (``config.mesh.rules``), as in maxtext: switching between plain
data parallelism, FSDP and context parallelism never touches model code.

Mesh axes: ``data`` (pure data parallel, parameters replicated), ``fsdp`` (data parallel with
parameters, gradients and optimizer state sharded), ``context`` (one clip's token sequence split
across devices).
"""

from __future__ import annotations

MESH_AXES = ("data", "fsdp", "context")

# Parameter axes.
EMBED = "embed"  # model channels D (2048 for the 2B)
MLP = "mlp"  # MLP hidden (4·D)
HEADS = "heads"  # q/k/v/output projection width (heads · head_dim)
HEAD_DIM = "head_dim"  # per-head q/k RMSNorm weight
ADALN = "adaln"  # AdaLN modulation widths (LoRA rank, 2D, 3D)
TEXT_IN = "text_in"  # raw text-embedding width (100352)
CROSS_EMBED = "cross_embed"  # projected text width (1024)
PATCH = "patch"  # patch-embed in / final-layer out features
LAYERS = "layers"  # stacked-block axis of scanned parameters
LORA_RANK = "lora_rank"  # rank r of LoRA adapters (A [in, r], B [r, out]); small, never split

# Activation axes.
ACT_BATCH = "act_batch"
ACT_LENGTH = "act_length"  # video tokens
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_TEXT = "act_text"  # text tokens

# Default rules: FSDP shards every large weight along its model-channel axis; batches are split
# over data x fsdp; video tokens over context. Anything not listed is replicated.
DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    (EMBED, "fsdp"),
    (TEXT_IN, "fsdp"),
    (MLP, None),
    (HEADS, None),
    (HEAD_DIM, None),
    (ADALN, None),
    (CROSS_EMBED, None),
    (PATCH, None),
    (LAYERS, None),
    (LORA_RANK, None),
    (ACT_BATCH, ("data", "fsdp")),
    (ACT_LENGTH, "context"),
    (ACT_EMBED, None),
    (ACT_HEADS, None),
    (ACT_TEXT, None),
)

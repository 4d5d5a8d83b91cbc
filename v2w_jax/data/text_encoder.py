"""The Cosmos-Reason1.1 FULL_CONCAT text encoder, run once per distinct caption into an embedding store.

The reference runs the 7B Qwen2.5-VL encoder online at every training step; its output is a pure
function of the caption, so this port computes it once per distinct caption and writes it to the
embedding store the loader memory-maps (``v2w_jax.data.text``). ``tools/compute_text_embeddings.py``
runs it over a dataset's captions; ``python -m v2w_jax.generate --text_encoder_dir`` over the prompts of
a generation spec that are not in the store yet. Recipe (the reference's, verified against
``fixtures/text_embed_tiny``; see that README for the traps):

1. Prompt: the processor chat template with the system message ``SYSTEM_PROMPT`` and one user
   turn holding the caption verbatim (list-of-text contents, no generation prompt, no vision ids).
   The template comes from the model folder's ``chat_template.json`` (the processor file) — the
   tokenizer route, because transformers 5's ``AutoProcessor`` for Qwen2.5-VL needs torchvision.
2. Tokens: the tokenizer with its default special tokens (none for Qwen2), right-padded with the
   pad id to exactly ``num_tokens`` (512), or truncated to it.
3. Forward in the model dtype (bf16), **no attention mask** (pad rows attend causally to the
   prompt and are kept), ``output_hidden_states``.
4. Hidden states 1..L (embedding output excluded; the last one is after the final RMSNorm), each
   standardised per token over its H features in the model dtype with the unbiased std + 1e-8,
   concatenated in layer order → [num_tokens, L·H] bf16 (L·H = 28·3584 = 100352 for Reason1.1).

torch and transformers (the ``[text]`` extra) are imported inside the functions that need them:
importing this module, like the rest of the package, needs neither.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import pathlib
from typing import Any, Sequence

import numpy as np

from v2w_jax.user_errors import UserError

_log = logging.getLogger(__name__)


class TextEncoderError(UserError):
  """The text encoder cannot run: its folder or its packages are missing."""


SYSTEM_PROMPT = "You are a helpful assistant who will provide prompts to an image generator."
NUM_TOKENS = 512
STD_EPS = 1e-8
ENCODER_NAME = "cosmos-reason1.1 full_concat (Qwen2.5-VL hidden states 1..L, per-token standardised)"


def load_chat_template(model_dir: str | os.PathLike) -> str | None:
  """The processor's chat template (``chat_template.json`` or ``.jinja``) if the folder has one."""
  d = pathlib.Path(model_dir)
  if (d / "chat_template.json").is_file():
    return json.loads((d / "chat_template.json").read_text())["chat_template"]
  if (d / "chat_template.jinja").is_file():
    return (d / "chat_template.jinja").read_text()
  return None


def render_prompt(tokenizer: Any, caption: str, chat_template: str | None = None) -> str:
  """The exact text the reference tokenises for ``caption``."""
  messages = [
      {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
      {"role": "user", "content": [{"type": "text", "text": caption}]},
  ]
  return tokenizer.apply_chat_template(
      messages,
      chat_template=chat_template,
      tokenize=False,
      add_generation_prompt=False,
      add_vision_id=False,
  )


def tokenize(tokenizer: Any, prompts: Sequence[str], num_tokens: int = NUM_TOKENS) -> np.ndarray:
  """Token ids [B, num_tokens] int64: right-padded with the pad id, or truncated (no mask)."""
  pad_id = tokenizer.pad_token_id
  if pad_id is None:
    raise ValueError("the tokenizer has no pad token id")
  out = np.full((len(prompts), num_tokens), pad_id, np.int64)
  for i, prompt in enumerate(prompts):
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"][:num_tokens]
    out[i, : len(ids)] = ids
  return out


def standardize_concat(hidden_states: Sequence[Any], eps: float = STD_EPS) -> Any:
  """Per-token standardisation of states 1..L (unbiased std, in their dtype), concatenated.

  Args:
    hidden_states: the model's L+1 states [B, P, H] (index 0 = embedding output, dropped).

  Returns:
    A torch tensor [B, P, L·H] in the states' dtype.
  """
  import torch  # pylint: disable=import-outside-toplevel

  parts = []
  for h in hidden_states[1:]:
    parts.append((h - h.mean(dim=-1, keepdim=True)) / (h.std(dim=-1, keepdim=True) + eps))
  return torch.cat(parts, dim=-1)


class ReasonTextEncoder:
  """A Hugging Face Qwen2.5-VL checkpoint folder (Cosmos-Reason1.1 or the tiny fixture) as an encoder."""

  def __init__(
      self,
      model_dir: str | os.PathLike,
      *,
      dtype: str = "bfloat16",
      device: str | None = None,
      num_tokens: int = NUM_TOKENS,
      attn_implementation: str = "sdpa",
  ):
    if not (pathlib.Path(model_dir) / "config.json").is_file():
      raise TextEncoderError(f"{model_dir}: not a Hugging Face model folder (no config.json); give the "
                             "Cosmos-Reason1 checkpoint folder")
    try:
      import torch  # pylint: disable=import-outside-toplevel
      import transformers  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise TextEncoderError(f"the text encoder needs torch and transformers ({e}); install the [text] extra: "
                             "pip install torch --index-url https://download.pytorch.org/whl/cpu && "
                             "pip install -e '.[text]'") from e

    self.model_dir = str(model_dir)
    self.num_tokens = int(num_tokens)
    self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    self.dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.model_dir)
    self.chat_template = load_chat_template(self.model_dir)
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        self.model_dir, dtype=self.dtype, attn_implementation=attn_implementation
    )
    self.model = model.eval().to(self.device)
    text_cfg = getattr(model.config, "text_config", model.config)
    self.num_layers = int(text_cfg.num_hidden_layers)
    self.hidden_size = int(text_cfg.hidden_size)

  @property
  def width(self) -> int:
    """Output features per token: num_layers · hidden_size (100352 for Reason1.1-7B)."""
    return self.num_layers * self.hidden_size

  def prompts(self, captions: Sequence[str]) -> list[str]:
    return [render_prompt(self.tokenizer, c, self.chat_template) for c in captions]

  def token_ids(self, captions: Sequence[str]) -> np.ndarray:
    return tokenize(self.tokenizer, self.prompts(captions), self.num_tokens)

  def embed_ids(self, ids: np.ndarray) -> Any:
    """Embeddings [B, P, L·H] (torch, model dtype, on CPU) of token ids [B, P]."""
    import torch  # pylint: disable=import-outside-toplevel

    with torch.inference_mode():
      out = self.model(
          input_ids=torch.as_tensor(ids, device=self.device),
          attention_mask=None,  # the reference passes none: pad rows are causal tokens, kept
          output_hidden_states=True,
          use_cache=False,
      )
      states = out.hidden_states
      if len(states) != self.num_layers + 1:
        raise RuntimeError(f"model returned {len(states)} hidden states, expected {self.num_layers + 1}")
      return standardize_concat(states).cpu()

  def embed(self, captions: Sequence[str]) -> np.ndarray:
    """Embeddings [B, P, L·H] as numpy: bf16 (ml_dtypes) for a bf16 model, else float32."""
    return to_numpy(self.embed_ids(self.token_ids(captions)))

  def close(self) -> None:
    """Frees the model and its device memory (the generator then hands the GPU to JAX)."""
    import torch  # pylint: disable=import-outside-toplevel

    self.model = None
    gc.collect()
    if torch.cuda.is_available():
      torch.cuda.empty_cache()


def to_numpy(t: Any) -> np.ndarray:
  """A torch tensor as numpy; bf16 keeps its bits (ml_dtypes.bfloat16), without a float32 copy."""
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel

  t = t.detach().cpu().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def compute_store(
    captions: Sequence[str],
    out_dir: str | os.PathLike,
    encoder: ReasonTextEncoder,
    *,
    batch_size: int = 8,
    overwrite: bool = False,
) -> list[str]:
  """Embeds the captions missing from the store at ``out_dir`` (all with ``overwrite``)."""
  from v2w_jax.data import text as text_lib  # pylint: disable=import-outside-toplevel

  store = text_lib.TextEmbeddingStore(out_dir)
  if store.exists() and not overwrite:
    info = store.info()
    if (info.tokens, info.width) != (encoder.num_tokens, encoder.width):
      raise text_lib.EmbeddingError(
          f"{store.index_path} holds [{info.tokens}, {info.width}] embeddings, this encoder makes "
          f"[{encoder.num_tokens}, {encoder.width}]: write to another store folder (the tool's --out_dir, the "
          "generator's --text_embeddings_dir), or replace it (the tool's --overwrite)"
      )
    todo = [c for c in captions if c not in store or store.validate(c, info.tokens, info.width) is not None]
  else:
    todo = list(captions)
  for i in range(0, len(todo), batch_size):
    chunk = todo[i : i + batch_size]
    emb = encoder.embed(chunk)
    store.write(zip(chunk, emb), encoder=f"{ENCODER_NAME}; model {encoder.model_dir}")
    _log.info("embedded %d/%d captions", min(i + batch_size, len(todo)), len(todo))
  return todo

"""Computes the Cosmos-Reason1.1 FULL_CONCAT text embedding of every distinct caption of a dataset.

The reference runs the 7B Qwen2.5-VL encoder online at every training step; its output is a pure
function of the caption, so this tool computes it once per distinct caption and writes it to the
embedding store the loader memory-maps (``v2w_jax.data.text``). Recipe (the reference's, verified
against ``fixtures/text_embed_tiny``; see that README for the traps):

1. Prompt: the processor chat template with the system message ``SYSTEM_PROMPT`` and one user
   turn holding the caption verbatim (list-of-text contents, no generation prompt, no vision ids).
   The template comes from the model folder's ``chat_template.json`` (the processor file) — the
   tokenizer route, because transformers 5's ``AutoProcessor`` for Qwen2.5-VL needs torchvision.
2. Tokens: the tokenizer with its default special tokens (none for Qwen2), right-padded with the
   pad id to exactly ``--num_tokens`` (512), or truncated to it.
3. Forward in the model dtype (bf16), **no attention mask** (pad rows attend causally to the
   prompt and are kept), ``output_hidden_states``.
4. Hidden states 1..L (embedding output excluded; the last one is after the final RMSNorm), each
   standardised per token over its H features in the model dtype with the unbiased std + 1e-8,
   concatenated in layer order → [num_tokens, L·H] bf16 (L·H = 28·3584 = 100352 for Reason1.1).

The store also gets the reference inference script's default negative prompt
(``v2w_jax.inference.spec.DEFAULT_NEGATIVE_PROMPT``, stored under its own text as the key), which
``python -m v2w_jax.generate`` uses for the unconditional CFG branch of samples without their own
negative prompt; ``--no_negative_prompt`` leaves it out.

torch and transformers (the ``[text]`` extra) are imported lazily: the base package never needs them.

    python tools/compute_text_embeddings.py DATASET --model_dir=/path/to/Cosmos-Reason1-7B \
        [--out_dir=DATASET/text_embeddings] [--batch_size=8] [--device=cuda] [--caption="..."] \
        [--no_negative_prompt]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
from typing import Any, Sequence

import numpy as np

SYSTEM_PROMPT = "You are a helpful assistant who will provide prompts to an image generator."
NUM_TOKENS = 512
STD_EPS = 1e-8
ENCODER_NAME = "cosmos-reason1.1 full_concat (Qwen2.5-VL hidden states 1..L, per-token standardised)"

_log = logging.getLogger("compute_text_embeddings")


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
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel

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


def to_numpy(t: Any) -> np.ndarray:
  """A torch tensor as numpy; bf16 keeps its bits (ml_dtypes.bfloat16), without a float32 copy."""
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel

  t = t.detach().cpu().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def dataset_captions(dataset_dir: str | os.PathLike) -> tuple[list[str], list[str]]:
  """Distinct captions of the dataset's videos (sorted), and the problems met reading them."""
  from v2w_jax.data import dataset as dataset_lib  # pylint: disable=import-outside-toplevel

  captions, problems = set(), []
  for video in dataset_lib.list_videos(dataset_dir):
    try:
      captions.add(dataset_lib.read_caption(video))
    except dataset_lib.DataError as e:
      problems.append(str(e))
  return sorted(captions), problems


def captions_to_embed(dataset_dir: str | os.PathLike | None, extra: Sequence[str] = (), *,
                      negative_prompt: bool = True) -> list[str]:
  """Distinct, sorted captions for the store: ``extra``, the dataset's captions (problems are logged and
  skipped) and, with ``negative_prompt``, the reference's default negative prompt."""
  from v2w_jax.inference.spec import DEFAULT_NEGATIVE_PROMPT  # pylint: disable=import-outside-toplevel

  captions = set(extra)
  if dataset_dir:
    found, problems = dataset_captions(dataset_dir)
    for p in problems:
      _log.warning("skipping: %s", p)
    captions.update(found)
  if negative_prompt:
    captions.add(DEFAULT_NEGATIVE_PROMPT)
  return sorted(captions)


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
      raise ValueError(
          f"{store.index_path} holds [{info.tokens}, {info.width}] embeddings, this encoder makes "
          f"[{encoder.num_tokens}, {encoder.width}]: use another --out_dir or --overwrite"
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


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("dataset_dir", nargs="?", help="DATASET with videos/ and metas/")
  parser.add_argument("--model_dir", required=True, help="Hugging Face folder of Cosmos-Reason1.1-7B")
  parser.add_argument("--out_dir", default="", help="store folder (default DATASET/text_embeddings)")
  parser.add_argument("--caption", action="append", default=[], help="embed this caption too (repeatable)")
  parser.add_argument("--num_tokens", type=int, default=NUM_TOKENS)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  parser.add_argument("--overwrite", action="store_true")
  parser.add_argument("--no_negative_prompt", action="store_true",
                      help="do not add the reference's default negative prompt to the store")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")

  from v2w_jax.data import text as text_lib  # pylint: disable=import-outside-toplevel

  captions = captions_to_embed(args.dataset_dir, args.caption, negative_prompt=not args.no_negative_prompt)
  if not captions:
    parser.error("no captions: give DATASET (with metas/*.txt) and/or --caption, or drop --no_negative_prompt")
  if not args.out_dir and not args.dataset_dir:
    parser.error("--out_dir is required without DATASET")
  out_dir = text_lib.default_store_dir(args.dataset_dir or ".", args.out_dir or None)
  encoder = ReasonTextEncoder(args.model_dir, dtype=args.dtype, device=args.device, num_tokens=args.num_tokens)
  done = compute_store(captions, out_dir, encoder, batch_size=args.batch_size, overwrite=args.overwrite)
  print(f"{out_dir}: wrote {len(done)} embeddings [{encoder.num_tokens}, {encoder.width}] bf16")
  return 0


if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  sys.exit(main())

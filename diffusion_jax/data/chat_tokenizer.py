"""Small byte-level BPE tokenizers for the vision–language configs trained from scratch, in transformers' layout.

The bundled ones (`diffusion_jax/assets/tokenizers/<name>/`) are built by

  python -m diffusion_jax.data.chat_tokenizer mnist_chat     # rewrites the bundled folder

from the sentences the bundled conversations use (`data.instructions`), with the `tokenizers` library: a folder
with `tokenizer.json` and a `tokenizer_config.json` naming the special tokens and the chat template
(`conversations.ChatFormat`), which `transformers.AutoTokenizer` and our `hf_tokenizer` read alike. Byte-level, so
any text (a held-out phrasing, a user's question) still tokenises, only into more pieces.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Iterable

from diffusion_jax.data import instructions, mnist
from diffusion_jax.data.conversations import ChatFormat
from diffusion_jax.data.pipeline import default_data_config
from diffusion_jax.data.sources import make_source
from diffusion_jax.data.tokenizers import BUNDLED

SPECIAL = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": None}
IMAGE_TOKEN = instructions.IMAGE
ASSETS = BUNDLED


def train(texts: Iterable[str], vocab_size: int, out_dir: str, fmt: ChatFormat = ChatFormat()) -> str:
  """Trains a byte-level BPE on `texts` and writes it (with its special tokens and chat template) to out_dir."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  specials = [SPECIAL["pad_token"], SPECIAL["bos_token"], SPECIAL["eos_token"], IMAGE_TOKEN]
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(list(texts), trainer)
  os.makedirs(out_dir, exist_ok=True)
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 16,
            "clean_up_tokenization_spaces": False, "chat_template": fmt.jinja(),
            "extra_special_tokens": {"image_token": IMAGE_TOKEN}, **SPECIAL}
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  return out_dir


def _mnist_texts() -> list[str]:
  """Every sentence the MNIST conversations can hold, held-out phrasings included: a tokenizer covers the
  language; which phrasings the model trains on is the data's business."""
  fmt = ChatFormat()
  texts = [fmt.prompt(q) for q in instructions.CAPTION_REQUESTS + instructions.CAPTION_REQUESTS_HELDOUT]
  for question in instructions.DIGIT_QUESTIONS:
    texts += [fmt.prompt(p.format(n=n)) for p in question.train + question.heldout for n in range(10)]
  texts += [t.format(name=name) for t in instructions.DIGIT_CAPTIONS for name in mnist.CLASS_NAMES]
  texts += list(instructions.WORDS) + ["ten", "yes", "no", "even", "odd"]
  return texts


def _emoji_texts() -> list[str]:
  """The training emoji's names (never the held-out ones: their words tokenise into smaller pieces, as unseen words
  do) and the caption requests."""
  data = default_data_config()
  data.update(source="emoji", channels=3)
  source = make_source(data, data.train_split)
  fmt = ChatFormat()
  texts = [fmt.prompt(q) for q in instructions.CAPTION_REQUESTS + instructions.CAPTION_REQUESTS_HELDOUT]
  return texts + [" " + source[i]["caption"] for i in range(len(source))]


# name -> (texts, vocabulary size)
BUILDERS = {"mnist_chat": (_mnist_texts, 512), "emoji_chat": (_emoji_texts, 1024)}


def bundled(name: str) -> str:
  """The folder of a bundled tokenizer."""
  return os.path.join(ASSETS, name)


def main(argv: list[str]) -> int:
  if len(argv) != 1 or argv[0] not in BUILDERS:
    print(f"usage: python -m diffusion_jax.data.chat_tokenizer {{{','.join(BUILDERS)}}}", file=sys.stderr)
    return 2
  texts, size = BUILDERS[argv[0]]
  print(train(texts(), size, bundled(argv[0])))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))

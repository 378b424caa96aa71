"""Text tokenizers behind one small interface, looked up by the name in `data.tokenizer`.

A tokenizer has `.vocab_size`, `.pad_id` and `__call__(texts, context_length) -> int32 [N, context_length]`.
The registry lets a module that needs heavier resources (a CLIP BPE vocabulary) add itself without this module
importing it. Tokenizer objects travel to grain's worker processes, so they must be picklable.
"""
from __future__ import annotations

import importlib
import os
import re
import zlib
from collections.abc import Callable, Sequence
from typing import Optional

import numpy as np

from diffusion_jax.config import ConfigError
from diffusion_jax.data.hf_tokenizer import HFTokenizer
from diffusion_jax.data.tokenizer_interface import check_tokenizer_call


class BytesTokenizer:
  """UTF-8 bytes as tokens: needs no vocabulary file, so it works offline for every language and emoji.

  Ids: 0 pad, 1 start-of-text, 2 end-of-text, byte b -> b + 3.
  """

  pad_id = 0
  sot_id = 1
  eot_id = 2
  _offset = 3
  vocab_size = 256 + _offset

  def __call__(self, texts: Sequence[str], context_length: int) -> np.ndarray:
    check_tokenizer_call(texts, context_length)
    out = np.full((len(texts), context_length), self.pad_id, np.int32)
    for row, text in enumerate(texts):
      body = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + self._offset
      # Truncate the body, not the end token: models pool or stop at EOT, so it must always be present.
      body = body[: context_length - 2]
      out[row, 0] = self.sot_id
      out[row, 1 : 1 + len(body)] = body
      out[row, 1 + len(body)] = self.eot_id
    return out

  def decode(self, tokens: np.ndarray) -> list[str]:
    """Texts back from token rows; a multi-byte character cut by truncation decodes as U+FFFD."""
    texts = []
    for row in np.atleast_2d(np.asarray(tokens)):
      ids = [int(t) for t in row]
      if ids and ids[0] == self.sot_id:
        ids = ids[1:]
      if self.eot_id in ids:
        ids = ids[: ids.index(self.eot_id)]
      data = bytes(t - self._offset for t in ids if t >= self._offset)
      texts.append(data.decode("utf-8", errors="replace"))
    return texts


class HashedWordTokenizer:
  """Lower-cased words hashed (CRC-32) into a fixed vocabulary: no vocabulary file, one token per word.

  For small caption sets trained from scratch a word is the unit of meaning; bytes make the model first learn
  to spell. Ids: 0 pad, 1 start-of-text, 2 end-of-text, words -> 3 + crc32(word) % (vocab_size - 3).
  """

  pad_id = 0
  sot_id = 1
  eot_id = 2

  def __init__(self, vocab_size: int = 4096):
    self.vocab_size = vocab_size

  def word_id(self, word: str) -> int:
    return 3 + zlib.crc32(word.encode("utf-8")) % (self.vocab_size - 3)

  def __call__(self, texts: Sequence[str], context_length: int) -> np.ndarray:
    check_tokenizer_call(texts, context_length)
    out = np.full((len(texts), context_length), self.pad_id, np.int32)
    for row, text in enumerate(texts):
      ids = [self.word_id(w) for w in re.findall(r"\w+", text.lower())][: context_length - 2]
      out[row, : len(ids) + 2] = [self.sot_id, *ids, self.eot_id]
    return out


_REGISTRY: dict[str, Callable[[], object]] = {"bytes": BytesTokenizer, "words": HashedWordTokenizer}
# Modules that register themselves on import, imported only when their tokenizer is asked for.
_LAZY = {"clip": "diffusion_jax.tokenizer"}


def register_tokenizer(name: str, factory: Callable[[], object]) -> None:
  """Makes `get_tokenizer(name)` return `factory()`; registering a taken name is a mistake, so it raises."""
  if name in _REGISTRY and _REGISTRY[name] is not factory:
    raise ValueError(f"tokenizer {name!r} is already registered")
  _REGISTRY[name] = factory


# Bundled transformers-layout tokenizers (tokenizer.json + tokenizer_config.json), by folder name.
BUNDLED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tokenizers")


def tokenizer_folder(name: str) -> Optional[str]:
  """The folder holding `tokenizer.json` that `name` means (a bundled name or a path), or None."""
  folder = os.path.join(BUNDLED, name) if name and os.sep not in name else name
  return folder if os.path.isfile(os.path.join(folder, "tokenizer.json")) else None


def get_tokenizer(name: str):
  """`data.tokenizer`: a registered name ('bytes', 'words', 'clip'), a bundled tokenizer folder's name, or the path
  of a folder with a transformers `tokenizer.json` (read by `hf_tokenizer.HFTokenizer`)."""
  if name not in _REGISTRY and name in _LAZY:
    importlib.import_module(_LAZY[name])
  if name in _REGISTRY:
    return _REGISTRY[name]()
  folder = tokenizer_folder(name)
  if folder is not None:
    return HFTokenizer.from_folder(folder)
  known = sorted(set(_REGISTRY) | set(_LAZY) | set(os.listdir(BUNDLED)))
  raise ConfigError(f"unknown data.tokenizer {name!r}; expected one of {known} or a folder with a tokenizer.json")

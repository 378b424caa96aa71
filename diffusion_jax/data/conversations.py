"""Conversations → training rows for a vision–language model: token ids, which of them are trained, one image.

A record holds an image and LLaVA-format turns (`data.instructions`). `ChatFormat` renders them as LLaVA-1.5's
"USER: <image>\\n… ASSISTANT: …</s>" text; only the assistant's words and the end token after them are trained
(the loss mask), the questions are context. The single `<image>` token becomes `num_image_tokens` copies of its id,
where the model puts the image features. Rows are cut to `max_len` from the right; a row whose image tokens would be
cut is dropped instead (valid=0), so an image is never half-seen.

`ChatFormat.jinja()` is the same format as a chat template, written into a tokenizer folder so that inference with
`apply_chat_template` builds exactly the prompts training saw.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Sequence

import grain
import numpy as np

from diffusion_jax.data.instructions import GPT, HUMAN, IMAGE
from diffusion_jax.data.records import DataError


@dataclasses.dataclass(frozen=True)
class ChatFormat:
  user: str = "USER: "
  assistant: str = " ASSISTANT:"

  def prompt(self, question: str) -> str:
    """A user turn and the assistant's cue: what generation continues."""
    return f"{self.user}{question}{self.assistant}"

  def segments(self, turns: Sequence[dict]) -> list[tuple[str, bool]]:
    """(text, trained) pieces of a conversation; the end token follows every trained piece."""
    out = []
    for turn in turns:
      if turn.get("from") == HUMAN:
        out.append((self.prompt(turn["value"]), False))
      elif turn.get("from") == GPT:
        out.append((" " + turn["value"].strip(), True))
      else:
        raise ValueError(f"a turn 'from' must be {HUMAN!r} or {GPT!r}, got {turn.get('from')!r}")
    return out

  def jinja(self) -> str:
    """The format as a transformers chat template (roles 'user'/'assistant'; content a string, or the structured
    list processors pass, where {'type': 'image'} stands for the image)."""
    content = ("{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
               "{% if c['type'] == 'image' %}" + IMAGE + "\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
               "{% endif %}")
    return ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}" + self.user + content +
            self.assistant + "{% else %} " + content + "{{ eos_token }}{% endif %}{% endfor %}")


@dataclasses.dataclass(frozen=True)
class ChatTokens:
  """What tokenising a conversation needs: a tokenizer (`hf_tokenizer.HFTokenizer`) and its image token's id."""
  tokenizer: Any
  image_id: int

  @classmethod
  def of(cls, tokenizer, image_token: str = IMAGE) -> "ChatTokens":
    image_id = tokenizer.tokenizer.token_to_id(image_token)
    if image_id is None:
      raise ValueError(f"the tokenizer has no {image_token!r} token")
    if tokenizer.bos_id is None or tokenizer.eos_id is None:
      raise ValueError("the tokenizer names no start (bos) or end (eos) token")
    return cls(tokenizer, image_id)

  @property
  def bos_id(self) -> int:
    return self.tokenizer.bos_id

  @property
  def eos_id(self) -> int:
    return self.tokenizer.eos_id

  @property
  def pad_id(self) -> int:
    return self.tokenizer.pad_id

  def encode(self, text: str) -> list[int]:
    """Ids of `text` alone: no special tokens added."""
    return self.tokenizer.encode([text], add_special_tokens=False)[0]


def tokenize_conversation(turns: Sequence[dict], tokens: ChatTokens, fmt: ChatFormat, *, max_len: int,
                          num_image_tokens: int) -> tuple[np.ndarray, np.ndarray, bool]:
  """(ids int32 [max_len], trained float32 [max_len], valid): the conversation padded or cut to max_len.

  trained[i] = 1 where token i is the assistant's (or its end token): the loss predicts those from position i-1.
  """
  ids, trained = [tokens.bos_id], [0.0]
  images = 0
  for text, is_answer in fmt.segments(turns):
    parts = text.split(IMAGE)
    for k, part in enumerate(parts):
      if k:
        ids += [tokens.image_id] * num_image_tokens
        trained += [0.0] * num_image_tokens
        images += 1
      piece = tokens.encode(part) if part else []
      ids += piece
      trained += [float(is_answer)] * len(piece)
    if is_answer:
      ids.append(tokens.eos_id)
      trained.append(1.0)
  last_image = max((i for i, t in enumerate(ids) if t == tokens.image_id), default=-1)
  valid = images == 1 and last_image < max_len and sum(trained[:max_len]) > 0
  ids, trained = ids[:max_len], trained[:max_len]
  pad = max_len - len(ids)
  return (np.asarray(ids + [tokens.pad_id] * pad, np.int32), np.asarray(trained + [0.0] * pad, np.float32),
          bool(valid))


class TokenizeConversation(grain.transforms.Map):
  """A decoded, fitted record → the model row {'image', 'tokens', 'loss_mask', 'label', 'valid'}."""

  def __init__(self, tokens: ChatTokens, fmt: ChatFormat, *, max_len: int, num_image_tokens: int,
               image_shape: tuple[int, int, int]):
    self.tokens, self.fmt, self.max_len = tokens, fmt, max_len
    self.num_image_tokens, self.image_shape = num_image_tokens, tuple(image_shape)

  def map(self, element: dict) -> dict:
    image, turns = element["image"], element.get("conversations") or []
    ids, trained, valid = tokenize_conversation(turns, self.tokens, self.fmt, max_len=self.max_len,
                                                num_image_tokens=self.num_image_tokens)
    valid = valid and image is not None
    pixels = (image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)) if valid else np.zeros(
        self.image_shape, np.float32)
    return {"image": pixels, "tokens": ids if valid else np.full_like(ids, self.tokens.pad_id),
            "loss_mask": trained if valid else np.zeros_like(trained),
            "label": np.asarray(element.get("label", -1), np.int32), "valid": np.asarray(valid, np.float32)}


def _read_records(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    if path.endswith(".jsonl"):
      records = []
      for n, line in enumerate(f, 1):
        if line.strip():
          try:
            records.append(json.loads(line))
          except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n} is not JSON: {e.msg}") from None
      return records
    try:
      records = json.load(f)
    except json.JSONDecodeError as e:
      raise DataError(f"{path} is not JSON: {e}") from None
  if not isinstance(records, list):
    raise DataError(f"{path} must hold a list of records like LLaVA's data files")
  return records


class ConversationSource:
  """LLaVA's data files: `data.path` a .json (a list) or .jsonl of {"image", "conversations"} records ('{split}'
  filled in), images relative to `image_folder` (default: the file's folder). Images are read when indexed."""

  def __init__(self, path: str, split: str, image_folder: str = ""):
    matches = sorted(glob.glob(path.format(split=split)))
    if not matches:
      raise DataError(f"no conversation file matches data.path={path!r} for split {split!r}")
    self.records = [r for m in matches for r in _read_records(m)]
    if not self.records:
      raise DataError(f"{path!r} ({split}) holds no records")
    for i, r in enumerate(self.records[:1000]):
      if not isinstance(r, dict) or not isinstance(r.get("conversations"), list):
        raise DataError(f"record {i} of {path!r} has no 'conversations' list")
    self.folder = image_folder or os.path.dirname(os.path.abspath(matches[0]))

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict:
    r = self.records[index]
    image = None
    if r.get("image"):
      try:
        with open(os.path.join(self.folder, r["image"]), "rb") as f:
          image = f.read()
      except OSError:
        image = None  # a missing image invalidates the record, as an undecodable one does
    return {"image": image, "caption": "", "label": int(r.get("label", -1)),
            "conversations": r["conversations"]}


__all__ = ["ChatFormat", "ChatTokens", "ConversationSource", "TokenizeConversation", "tokenize_conversation"]

"""The tokenizer of a transformers folder (`tokenizer.json`), without importing transformers.

  tok = HFTokenizer.from_folder("path/to/folder")
  ids = tok.encode(["Hello"])                        # list[list[int]], with the special tokens the folder adds
  batch = tok(["Hello"], context_length=64)          # int32 [1, 64], right-padded with pad_id (data.tokenizers' API)
  prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])

The `tokenizers` library runs the folder's own pipeline (normaliser, pre-tokeniser, model, post-processor,
decoder), so ids agree with transformers' fast tokenizer by construction; this module only adds what transformers
keeps in tokenizer_config.json: the names of the special tokens and the chat template. The template is rendered in
jinja2's immutable sandbox because templates come with downloaded checkpoints and are untrusted code.
"""
from __future__ import annotations

import datetime
import json
import os
from collections.abc import Sequence
from typing import Any, Optional

import jinja2
import jinja2.ext
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from diffusion_jax.data.tokenizer_interface import check_tokenizer_call

__all__ = ["HFTokenizer"]

SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")
# transformers' `clean_up_tokenization`: spaces a word-level detokeniser leaves before punctuation and contractions.
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _token_text(value: Any) -> Optional[str]:
  """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with its `content`."""
  return value.get("content") if isinstance(value, dict) else value


class _Generation(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering ignores it."""
  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

  def _body(self, caller):
    return caller()


def _raise_exception(message: str):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  # jinja2's own tojson escapes HTML characters, which would change what the model sees.
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
  # The options transformers renders chat templates with, so the prompt strings agree character for character.
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[jinja2.ext.loopcontrols, _Generation])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env


class HFTokenizer:
  """`tokenizer.json` plus the special tokens and chat template of tokenizer_config.json.

  Picklable for grain's workers: the state is the serialised tokenizer and the config, not an open handle.
  """

  def __init__(self, tokenizer_json: str, config: dict, chat_template: Optional[str] = None):
    self._json, self.config = tokenizer_json, dict(config)
    self.tokenizer = Tokenizer.from_str(tokenizer_json)
    self.chat_template = chat_template if chat_template is not None else config.get("chat_template")
    self.special_tokens = {name: _token_text(config.get(name)) for name in SPECIAL_NAMES}
    ids = {name: None if text is None else self.tokenizer.token_to_id(text) for name, text in
           self.special_tokens.items()}
    self.bos_id, self.eos_id, self.unk_id = ids["bos_token"], ids["eos_token"], ids["unk_token"]
    # Many decoder checkpoints name no pad token; padding then reuses the end token, as their fine-tuning recipes do.
    pad = ids["pad_token"] if ids["pad_token"] is not None else self.eos_id
    self.pad_id = 0 if pad is None else pad
    self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
    self._cleanup = bool(config.get("clean_up_tokenization_spaces", False))
    self._template = None

  @classmethod
  def from_folder(cls, folder: str) -> "HFTokenizer":
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"no tokenizer.json in {folder} (only fast-tokenizer folders are supported)")
    with open(path, encoding="utf-8") as f:
      tokenizer_json = f.read()
    config = _read_json(os.path.join(folder, "tokenizer_config.json"))
    template = None
    jinja_path = os.path.join(folder, "chat_template.jinja")  # transformers >= 4.50 saves the template apart
    if os.path.isfile(jinja_path):
      with open(jinja_path, encoding="utf-8") as f:
        template = f.read()
    return cls(tokenizer_json, config, template)

  def __getstate__(self):
    return {"tokenizer_json": self._json, "config": self.config, "chat_template": self.chat_template}

  def __setstate__(self, state):
    self.__init__(state["tokenizer_json"], state["config"], state["chat_template"])

  def encode(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
    if isinstance(texts, str):
      raise TypeError("pass a list of texts, not a single str")
    return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

  def __call__(self, texts: Sequence[str], context_length: int) -> np.ndarray:
    """int32 [N, context_length]: each text's ids (special tokens included), cut to fit, then pad_id."""
    check_tokenizer_call(texts, context_length)
    out = np.full((len(texts), context_length), self.pad_id, np.int32)
    for row, ids in enumerate(self.encode(texts)):
      ids = ids[:context_length]
      out[row, :len(ids)] = ids
    return out

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    text = self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
    if self._cleanup:
      for before, after in _CLEANUP:
        text = text.replace(before, after)
    return text

  def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True, **variables) -> str:
    """The prompt string the folder's chat template makes of `messages` (dicts with 'role' and 'content').

    Extra keyword arguments become template variables (`tools`, `documents`, model-specific switches), as in
    transformers; the special tokens are available as `bos_token`, `eos_token`, ...
    """
    if not self.chat_template:
      raise ValueError("this tokenizer has no chat_template (neither in tokenizer_config.json nor chat_template.jinja)")
    if not isinstance(self.chat_template, str):
      raise ValueError("named chat templates (a list in tokenizer_config.json) are not supported")
    if self._template is None:
      self._template = _environment().from_string(self.chat_template)
    context = {name: text for name, text in self.special_tokens.items() if text is not None}
    context.update(tools=None, documents=None)
    context.update(variables)
    return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **context)

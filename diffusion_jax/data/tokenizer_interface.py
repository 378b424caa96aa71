"""What every tokenizer behind `data.tokenizer` offers, and the argument check they share.

A tokenizer has `.vocab_size`, `.pad_id` and `__call__(texts, context_length) -> int32 [N, context_length]`.
The check lives here, below both `tokenizers` (the registry that picks one by name) and `hf_tokenizer` (one of the
tokenizers it picks), so that each imports it without importing the other: the registry knows its tokenizers, a
tokenizer does not know the registry.
"""
from __future__ import annotations


def check_tokenizer_call(texts, context_length: int) -> None:
  if context_length < 2:
    raise ValueError(f"context_length must leave room for start and end tokens, got {context_length}")
  if isinstance(texts, str):
    raise TypeError("pass a list of texts, not a single str")

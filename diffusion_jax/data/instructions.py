"""Conversations about the bundled images, in LLaVA's format, for captioning and visual question answering.

  {"image": ..., "conversations": [{"from": "human", "value": "<image>\\nWhat digit is this?"},
                                   {"from": "gpt", "value": "seven"}]}

`captions`: the image's caption (or its class name in a caption template) as the answer to a request for a
description, what LLaVA's stage 1 trains the projector on. `digit_vqa`: questions about an MNIST digit (which digit,
even or odd, the digit plus one, "is this a 7?"), what stage 2 fine-tunes on. Every question kind has training
phrasings and held-out phrasings that training never sees, so evaluation measures understanding of the question
rather than a memorised sentence.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from diffusion_jax.data import transforms

IMAGE = "<image>"
HUMAN, GPT = "human", "gpt"
KINDS = ("captions", "digit_vqa")

CAPTION_REQUESTS = ("Describe the image briefly.", "What is in this picture?", "Give a short caption.",
                    "Describe this image.")
CAPTION_REQUESTS_HELDOUT = ("Write a caption for this image.", "What does the picture show?")

# The caption phrasings of configs/mnist_clip.py, whose vision tower a MNIST LLaVA reuses.
DIGIT_CAPTIONS = ("a handwritten digit {name}", "a photo of the number {name}", "the digit {name}, written by hand",
                  "a black and white image of a {name}", "{name}")
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclasses.dataclass(frozen=True)
class Question:
  kind: str
  train: tuple[str, ...]
  heldout: tuple[str, ...]

  def answer(self, digit: int, asked: int) -> str:
    if self.kind == "which":
      return WORDS[digit]
    if self.kind == "parity":
      return "even" if digit % 2 == 0 else "odd"
    if self.kind == "plus_one":
      return "ten" if digit == 9 else WORDS[digit + 1]
    return "yes" if digit == asked else "no"


# {n}: the digit asked about, as a numeral (only the "is_it" kind).
# Training phrasings vary their framing ("Tell me ...", "Can you ...", "... in this image") across every kind, so
# that only the content words (digit, number, even/odd, one more, a numeral) tell the kinds apart; the held-out
# phrasings then recombine them in sentences training never saw.
DIGIT_QUESTIONS = (
    Question("which", ("What digit is this?", "Which digit is shown?", "What number is written here?",
                       "Name the digit.", "Identify the number in this picture.", "Read the digit for me.",
                       "Please say which digit this is.", "Tell me what number is written here.",
                       "What digit does this image show?", "Can you read this number?"),
             ("Which number is in the image?", "Tell me the digit you see.")),
    Question("parity", ("Is the digit even or odd?", "Even or odd?", "Is this number odd or even?",
                        "Tell me whether the digit is odd or even.", "Can you say if this number is even or odd?",
                        "Is the number in this image odd or even?"),
             ("Would you call this digit odd or even?",)),
    Question("plus_one", ("What is the digit plus one?", "Add one to the digit.", "What number comes after this one?",
                          "Tell me the number that is one more than this digit.",
                          "What is one more than the number in this image?", "Can you add one to this digit?"),
             ("What do you get when you add one to this number?",)),
    Question("is_it", ("Is this a {n}?", "Is the digit a {n}?", "Does this show the number {n}?",
                       "Tell me if this is a {n}.", "Can you tell me if the image shows a {n}?",
                       "Is the number in this picture a {n}?"),
             ("Could this digit be a {n}?",)),
)


def conversation(question: str, answer: str) -> list[dict]:
  return [{"from": HUMAN, "value": f"{IMAGE}\n{question}"}, {"from": GPT, "value": answer}]


def caption_turn(caption: str, rng: np.random.Generator, heldout: bool = False) -> list[dict]:
  requests = CAPTION_REQUESTS_HELDOUT if heldout else CAPTION_REQUESTS
  return conversation(requests[int(rng.integers(len(requests)))], caption)


def digit_question(digit: int, rng: np.random.Generator, heldout: bool = False,
                   kinds: Sequence[str] = ()) -> tuple[str, str, str]:
  """(kind, question, answer) about `digit`, of a random kind and phrasing. "Is this a n?" asks about the true
  digit half of the time, so yes and no are equally likely."""
  pool = [q for q in DIGIT_QUESTIONS if not kinds or q.kind in kinds]
  q = pool[int(rng.integers(len(pool)))]
  phrasings = q.heldout if heldout else q.train
  text = phrasings[int(rng.integers(len(phrasings)))]
  asked = digit if rng.random() < 0.5 else int((digit + rng.integers(1, 10)) % 10)
  return q.kind, text.format(n=asked), q.answer(digit, asked)


class MakeConversation:
  """A grain RandomMap body: sets 'conversations' from the record's caption or label unless it has them already.

  `kind` 'captions' answers a description request with the caption (a template filled with the class name when
  the record has none); 'digit_vqa' asks one digit question, or with probability `caption_share` for a caption, so
  the fine-tuned model keeps captioning. Training draws phrasings at random; `heldout` uses only held-out ones.
  """

  def __init__(self, kind: str, templates: Sequence[str], class_names: Sequence[str], *, heldout: bool = False,
               caption_share: float = 0.3):
    if kind not in KINDS:
      raise ValueError(f"data.conversations {kind!r} is not one of {KINDS} (or '' for records that carry them)")
    self.kind, self.templates, self.class_names = kind, tuple(templates), tuple(class_names)
    self.heldout, self.caption_share = heldout, caption_share

  def __call__(self, element: dict, rng: np.random.Generator) -> dict:
    if element.get("conversations"):
      return element
    label = int(element.get("label", -1))
    caption = element.get("caption") or (transforms.fill_template(
        self.templates[int(rng.integers(len(self.templates)))], label, self.class_names) if label >= 0 else "")
    if self.kind == "digit_vqa" and 0 <= label <= 9 and rng.random() >= self.caption_share:
      _, question, answer = digit_question(label, rng, self.heldout)
      turns = conversation(question, answer)
    elif caption:
      turns = caption_turn(caption, rng, self.heldout)
    else:
      turns = []
    return {**element, "conversations": turns}


__all__ = ["CAPTION_REQUESTS", "CAPTION_REQUESTS_HELDOUT", "DIGIT_CAPTIONS", "DIGIT_QUESTIONS", "GPT", "HUMAN", "IMAGE", "KINDS",
           "MakeConversation", "Question", "WORDS", "caption_turn", "conversation", "digit_question"]

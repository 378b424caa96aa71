"""The scoring rules of the image-to-text evaluators, and the held-out question phrasings staying held out."""
import numpy as np
import pytest

from diffusion_jax.data import instructions
from diffusion_jax.evaluators.captioning import names_digit, token_f1


def test_a_caption_names_one_digit_and_only_that_one():
  assert names_digit("a handwritten digit seven", 7)
  assert names_digit("The number 7.", 7)
  assert not names_digit("a handwritten digit seven or one", 7)  # hedging between digits is wrong
  assert not names_digit("a handwritten digit", 7)
  assert not names_digit("seventeen", 7)  # whole words only


@pytest.mark.parametrize("prediction, reference, f1", [
    ("smiling face with halo", "smiling face with halo", 1.0),
    ("smiling face", "smiling face with halo", 2 * 1.0 * 0.5 / 1.5),
    ("cat", "dog face", 0.0),
    ("face face", "face", 2 * 0.5 * 1.0 / 1.5),  # repeated words count once per occurrence in the reference
    ("", "", 1.0),
])
def test_token_f1_is_squads(prediction, reference, f1):
  assert token_f1(prediction, reference) == pytest.approx(f1)


def test_heldout_phrasings_never_appear_in_training_and_answers_follow_the_digit():
  for q in instructions.DIGIT_QUESTIONS:
    assert not set(q.heldout) & set(q.train), q.kind
  assert not set(instructions.CAPTION_REQUESTS_HELDOUT) & set(instructions.CAPTION_REQUESTS)
  rng = np.random.default_rng(0)
  seen = {}
  for _ in range(400):
    kind, question, answer = instructions.digit_question(4, rng, heldout=True)
    seen.setdefault(kind, set()).add(answer)
    if kind == "is_it":
      assert answer == ("yes" if "4" in question else "no")
  assert seen == {"which": {"four"}, "parity": {"even"}, "plus_one": {"five"}, "is_it": {"yes", "no"}}

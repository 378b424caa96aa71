"""Conversations → rows: which tokens train, where the image goes, truncation that never cuts the image, LLaVA-format
files written by the prepare command and read back through the shared pipeline, and the bundled chat tokenizer."""
import json
import os

import numpy as np
import pytest

from diffusion_jax.data import chat_tokenizer, instructions, mnist, pipeline
from diffusion_jax.data.conversations import ChatFormat, ChatTokens, ConversationSource, tokenize_conversation
from diffusion_jax.data.prepare_conversations import main as prepare_main
from diffusion_jax.data.records import DataError
from diffusion_jax.data.hf_tokenizer import HFTokenizer

TOK = HFTokenizer.from_folder(chat_tokenizer.bundled("mnist_chat"))
TOKENS = ChatTokens.of(TOK)


def _decode(ids):
  return TOK.decode([int(i) for i in ids])


def test_only_the_answers_and_their_end_tokens_train():
  turns = instructions.conversation("What digit is this?", "seven") + [
      {"from": "human", "value": "Even or odd?"}, {"from": "gpt", "value": "odd"}]
  ids, trained, valid = tokenize_conversation(turns, TOKENS, ChatFormat(), max_len=64, num_image_tokens=5)
  assert valid and ids[0] == TOKENS.bos_id
  assert list(ids).count(TOKENS.image_id) == 5
  first = list(ids).index(TOKENS.image_id)
  assert list(ids[first:first + 5]) == [TOKENS.image_id] * 5  # the placeholder expands in place
  answers = ids[trained > 0]
  assert _decode([t for t in answers if t != TOKENS.eos_id]).split() == ["seven", "odd"]
  assert list(answers).count(TOKENS.eos_id) == 2  # each answer ends with the end token, which trains
  text = _decode([t for t in ids if t not in (TOKENS.image_id, TOKENS.pad_id)])
  # The special tokens (<s>, </s>) are skipped in decoding; the rest is LLaVA-1.5's format.
  assert text == "USER: \nWhat digit is this? ASSISTANT: sevenUSER: Even or odd? ASSISTANT: odd"


def test_truncation_cuts_text_but_never_the_image():
  turns = instructions.conversation("What digit is this?", "seven")
  ids, _, valid = tokenize_conversation(turns, TOKENS, ChatFormat(), max_len=64, num_image_tokens=16)
  n = int((ids != TOKENS.pad_id).sum())
  cut, trained, valid = tokenize_conversation(turns, TOKENS, ChatFormat(), max_len=n - 1, num_image_tokens=16)
  assert valid and list(cut) == list(ids[:n - 1]) and trained[-1] == 1  # the end token went, the answer stayed
  _, _, valid = tokenize_conversation(turns, TOKENS, ChatFormat(), max_len=10, num_image_tokens=16)
  assert not valid  # the image would be cut: the row is dropped instead
  _, _, valid = tokenize_conversation([{"from": "human", "value": "no image here"}, {"from": "gpt", "value": "ok"}],
                                      TOKENS, ChatFormat(), max_len=64, num_image_tokens=16)
  assert not valid  # one image per row


def test_prepared_files_read_back_through_the_pipeline(tmp_path):
  out = str(tmp_path / "data")
  assert prepare_main(["mnist", out, "--limit", "6"]) == 0
  records = [json.loads(line) for line in open(os.path.join(out, "test.jsonl"))]
  assert len(records) == 6
  heldout = {p for q in instructions.DIGIT_QUESTIONS for p in q.heldout} | set(instructions.CAPTION_REQUESTS_HELDOUT)
  for r in records:  # the eval split is asked in held-out phrasings only
    question = r["conversations"][0]["value"].split("\n", 1)[1]
    assert any(question == h.format(n=n) for h in heldout for n in range(10)), question
  source = ConversationSource(os.path.join(out, "{split}.jsonl"), "test")
  images, labels = mnist.load_mnist("test")
  raw = source[3]
  assert raw["label"] == labels[3] and raw["conversations"] == records[3]["conversations"]

  from configs.mnist_llava import get_config
  c = get_config("lm,tiny")
  c.data.update(source="conversations", path=os.path.join(out, "{split}.jsonl"), conversations="")
  from diffusion_jax.train.task import get_task
  task = get_task(c)
  batch = next(iter(pipeline.make_dataset(c.data, "test", global_batch_size=6, seed=0, shuffle=False, repeat=False,
                                          drop_remainder=False, examples=task.data_examples)))
  assert batch["valid"].tolist() == [1.0] * 6
  np.testing.assert_array_equal(batch["image"][3, ..., 0], images[3] / np.float32(127.5) - 1.0)
  answer = [t for t, m in zip(batch["tokens"][3], batch["loss_mask"][3]) if m and t != TOKENS.eos_id]
  assert _decode(answer).strip() == records[3]["conversations"][1]["value"]


def test_bad_conversation_files_fail_in_one_line(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_text('{"image": "a.png", "conversations": []}\n{not json\n')
  with pytest.raises(DataError, match=r"train.jsonl:2 is not JSON"):
    ConversationSource(str(tmp_path / "{split}.jsonl"), "train")
  with pytest.raises(DataError, match="no conversation file matches"):
    ConversationSource(str(tmp_path / "{split}.jsonl"), "test")
  (tmp_path / "val.json").write_text('[{"image": "a.png"}]')
  with pytest.raises(DataError, match="has no 'conversations' list"):
    ConversationSource(str(tmp_path / "{split}.json"), "val")


def test_the_bundled_tokenizer_is_what_its_builder_writes(tmp_path):
  texts, size = chat_tokenizer.BUILDERS["mnist_chat"]
  rebuilt = chat_tokenizer.train(texts(), size, str(tmp_path / "tok"))
  for name in ("tokenizer.json", "tokenizer_config.json"):
    with open(os.path.join(rebuilt, name)) as a, open(os.path.join(chat_tokenizer.bundled("mnist_chat"), name)) as b:
      assert json.load(a) == json.load(b), name

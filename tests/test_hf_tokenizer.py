"""data.hf_tokenizer against transformers' own fast tokenizer on a tiny BPE trained offline and saved with
save_pretrained: ids, padding, decoding, chat template strings and pickling."""
import pickle

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from diffusion_jax.data.hf_tokenizer import HFTokenizer  # noqa: E402

SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
# ChatML with a default system prompt, a loop control and the eos variable, so trim/lstrip and globals all matter.
CHATML = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
    "{% for message in messages %}\n"
    "  {% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}\n"
    "  {{- '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>' + '\n' }}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% else %}{{ eos_token }}{% endif %}")
TEXTS = ["Hello world, the quick brown fox!", "digits 0123456789 and 3.14", "emoji 😀🎉 mixed ✨",
         "accents: café naïve Ærøskøbing", "special <|im_start|>user\nhi<|im_end|> inside", "", "   spaces  "]
MESSAGES = [{"role": "user", "content": "  What is 2+2?  "}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "café 😀"}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  corpus = ["the quick brown fox jumps over the lazy dog", "numbers 12345 67890", "café naïve résumé",
            "emoji 😀 party 🎉", "hello world"] * 20
  tok.train_from_iterator(corpus, trainer)
  bos = tok.token_to_id("<|bos|>")
  tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                     special_tokens=[("<|bos|>", bos)])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                              pad_token="<|pad|>", chat_template=CHATML)
  path = str(tmp_path_factory.mktemp("tokenizer"))
  fast.save_pretrained(path)
  return path


def test_ids_and_decoding_match_transformers(folder):
  ref = transformers.AutoTokenizer.from_pretrained(folder)
  ours = HFTokenizer.from_folder(folder)
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
  assert ours.vocab_size == len(ref)
  for special in (True, False):
    assert ours.encode(TEXTS, add_special_tokens=special) == ref(TEXTS, add_special_tokens=special)["input_ids"]
  for ids in ours.encode(TEXTS):
    assert ids[0] == ours.bos_id
    for skip in (True, False):
      assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
  # Byte-level BPE is lossless; special tokens written in the text come back when they are not skipped.
  assert [ours.decode(ids, skip_special_tokens=False) for ids in ours.encode(TEXTS, add_special_tokens=False)] == TEXTS


def test_padded_batch(folder):
  ours = HFTokenizer.from_folder(folder)
  batch = ours(TEXTS[:3], context_length=12)
  assert batch.dtype == np.int32 and batch.shape == (3, 12)
  for row, ids in zip(batch, ours.encode(TEXTS[:3])):
    n = min(len(ids), 12)
    assert row[:n].tolist() == ids[:n] and (row[n:] == ours.pad_id).all()


def test_chat_template_matches_transformers(folder):
  ref = transformers.AutoTokenizer.from_pretrained(folder)
  ours = HFTokenizer.from_folder(folder)
  for gen in (True, False):
    want = ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
    assert ours.apply_chat_template(MESSAGES, add_generation_prompt=gen) == want
  assert ours.apply_chat_template(MESSAGES).endswith("<|im_start|>assistant\n")
  with pytest.raises(Exception, match="unknown role tool"):
    ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_pickles_for_data_workers(folder):
  ours = HFTokenizer.from_folder(folder)
  ours.apply_chat_template(MESSAGES)  # a compiled template must not stop pickling
  back = pickle.loads(pickle.dumps(ours))
  assert back.encode(TEXTS) == ours.encode(TEXTS)
  assert back.apply_chat_template(MESSAGES) == ours.apply_chat_template(MESSAGES)

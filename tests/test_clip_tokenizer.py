"""CLIP tokenizer: ids must equal open_clip's (and transformers' for SD folders), since pretrained text
encoders only understand the exact ids they were trained on."""
import importlib.util
import json
import os
import pickle

import numpy as np
import pytest

pytest.importorskip("regex")
pytest.importorskip("torch")
if importlib.util.find_spec("open_clip") is None:
  pytest.skip("open-clip-torch not installed", allow_module_level=True)

from diffusion_jax.data.tokenizers import get_tokenizer  # noqa: E402
from diffusion_jax.tokenizer import CLIPTokenizer, write_vocab_and_merges  # noqa: E402

LONG_CAPTION = " ".join(f"word{i % 17} of the {i}th sentence, quite long" for i in range(40))
assert len(LONG_CAPTION.split()) >= 200

TEXTS = [
  "a photo of a cat",
  "A PHOTO OF A DOG",
  "Hello, world!",
  "it's a dog's life; they're here and we've gone, I'm sure you'll say I'd know",
  "numbers 1234567890 and 3.14159 and -42",
  "café naïve résumé Ångström Über",
  "東京の夜景、美しい",
  "中文测试 한국어 テスト",
  "emoji party 🎉🐱‍👤👍🏽 and 🇫🇷 flags",
  "rock &amp; roll &lt;3 &quot;quoted&quot; &amp;amp; double",
  "multiple    spaces\n\nand\tnewlines\r\n end",
  "   leading and trailing   ",
  LONG_CAPTION,
  "",
  "!!!???...,,,;;;",
  "snake_case and kebab-case and CamelCase",
  "https://example.com/path?query=1&x=y",
  "email me at someone@example.org",
  "Ṫḧïṡ ïṡ ẅëïṙḋ",
  "Ελληνικά και русский текст",
  "عربي עברית हिन्दी",
  "mojibake: â€œquotedâ€\x9d and Ã©",
  "<start_of_text> literal specials <end_of_text> inside",
  "tabs\tand\x0bvertical\x0cform feeds",
  "zero\u200bwidth joiner\u200d and nbsp\u00a0here",
  "a" * 300,
  "supercalifragilisticexpialidocious antidisestablishmentarianism",
  "$100 €50 £20 ¥1000 ₿0.5",
  "a photograph of an astronaut riding a horse, trending on artstation, 4k, highly detailed",
  "(masterpiece:1.2), [best quality], {ultra-detailed}",
  "½ ¼ ² ³ ™ © ®",
  "x",
]


def _open_clip_tokenize():
  """open_clip.tokenize; if the package's __init__ needs torchvision/timm that aren't installed, load only its
  tokenizer module (same code, same function) straight from the file."""
  try:
    import open_clip
    return open_clip.tokenize
  except ImportError:
    location = importlib.util.find_spec("open_clip").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", os.path.join(location, "tokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tokenize


@pytest.fixture(scope="module")
def tok():
  return CLIPTokenizer()


@pytest.fixture(scope="module")
def reference():
  return _open_clip_tokenize()


def test_reference_ids(tok):
  ids = tok(["a photo of a cat"], context_length=77)
  assert ids.dtype == np.int32 and ids.shape == (1, 77)
  assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
  assert not ids[0, 7:].any()
  assert tok.vocab_size == 49408 and tok.pad_id == 0


@pytest.mark.parametrize("context_length", [77, 16])
def test_parity_with_open_clip(tok, reference, context_length):
  ours = tok(TEXTS, context_length=context_length)
  theirs = reference(TEXTS, context_length=context_length).numpy()
  assert ours.shape == (len(TEXTS), context_length) and ours.dtype == np.int32
  for text, a, b in zip(TEXTS, ours, theirs):
    assert a.tolist() == b.tolist(), text


def test_truncation_keeps_eot(tok):
  ids = tok([LONG_CAPTION], context_length=77)[0]
  assert ids[0] == 49406 and ids[-1] == 49407
  assert (ids != 0).all()
  short = tok([LONG_CAPTION], context_length=16)[0]
  assert short[-1] == 49407 and short[:15].tolist() == ids[:15].tolist()


def test_pickle_round_trip(tok):
  clone = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(clone(TEXTS, 77), tok(TEXTS, 77))


def test_registry():
  t = get_tokenizer("clip")
  assert isinstance(t, CLIPTokenizer)
  assert t.vocab_size == 49408 and t.pad_id == 0
  assert t(["a photo of a cat"], 77)[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_missing_vocab_file(tmp_path):
  missing = str(tmp_path / "nope.txt.gz")
  with pytest.raises(FileNotFoundError, match="nope.txt.gz"):
    CLIPTokenizer(bpe_path=missing)
  with pytest.raises(FileNotFoundError, match="vocab.json"):
    CLIPTokenizer.from_pretrained_folder(str(tmp_path))


def _write_hf_folder(folder, pad_token):
  """A transformers-style CLIP tokenizer folder derived from the bundled BPE file (what SD ships)."""
  paths = write_vocab_and_merges(folder)
  with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
    json.dump({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad_token,
               "unk_token": "<|endoftext|>"}, f)
  return paths


# Texts on which every CLIP tokenizer flavour agrees (no html entities or mojibake repair).
HF_TEXTS = [
  "a photo of a cat",
  "A PHOTO OF A DOG",
  "Hello, world!",
  "it's a dog's life; they're here",
  "numbers 1234567890 and 3.14159",
  "multiple    spaces\n\nand\tnewlines",
  "a photograph of an astronaut riding a horse, trending on artstation, 4k",
  "(masterpiece:1.2), [best quality], {ultra-detailed}",
  LONG_CAPTION,
  "",
]


def test_from_pretrained_folder_matches_transformers(tmp_path):
  transformers = pytest.importorskip("transformers")
  vocab_file, merges_file = _write_hf_folder(str(tmp_path / "tokenizer"), "<|endoftext|>")
  hf = transformers.CLIPTokenizer(vocab_file, merges_file)
  expected = np.asarray(hf(HF_TEXTS, padding="max_length", max_length=77, truncation=True).input_ids)
  ours = CLIPTokenizer.from_pretrained_folder(str(tmp_path))  # pipeline root: finds tokenizer/
  assert ours.pad_id == 49407 and ours.vocab_size == 49408
  np.testing.assert_array_equal(ours(HF_TEXTS, 77), expected)
  # The open_clip vocabulary gives the same ids up to padding.
  plain = CLIPTokenizer()(HF_TEXTS, 77)
  np.testing.assert_array_equal(np.where(plain == 0, 49407, plain), expected)


def test_from_pretrained_folder_sd2_pads_with_zero(tmp_path):
  _write_hf_folder(str(tmp_path), "!")
  ours = CLIPTokenizer.from_pretrained_folder(str(tmp_path))
  assert ours.pad_id == 0
  np.testing.assert_array_equal(ours(TEXTS[:3], 77), CLIPTokenizer()(TEXTS[:3], 77))
  assert pickle.loads(pickle.dumps(ours))(["x"], 8).tolist() == ours(["x"], 8).tolist()


@pytest.mark.parametrize("pad_token, pad_id", [("<|endoftext|>", 49407), ("!", 0)])
def test_from_tokenizer_json_alone_matches_transformers(tmp_path, pad_token, pad_id):
  """transformers 5's `save_pretrained` writes tokenizer.json + tokenizer_config.json only (no vocab.json)."""
  transformers = pytest.importorskip("transformers")
  vocab_file, merges_file = _write_hf_folder(str(tmp_path / "src"), pad_token)
  saved = str(tmp_path / "pipe" / "tokenizer")
  transformers.CLIPTokenizer(vocab_file, merges_file, pad_token=pad_token).save_pretrained(saved)
  assert not os.path.exists(os.path.join(saved, "vocab.json"))
  hf = transformers.AutoTokenizer.from_pretrained(saved)
  texts = HF_TEXTS + ["café naïve résumé", "東京の夜景", "emoji 🎉 party"]
  if pad_token == "!":
    # transformers splits a literal "!" out as the special pad token (id 0); open_clip, which SD 2's text encoder
    # was trained with, keeps it a word piece ("!</w>" = 256), and so do we. Compare on texts without one.
    assert hf(["wow!"]).input_ids[0][-2] == 0 and CLIPTokenizer.from_pretrained_folder(saved)(["wow!"], 8)[0, 2] == 256
    texts = [t for t in texts if "!" not in t]
  expected = np.asarray(hf(texts, padding="max_length", max_length=77, truncation=True).input_ids)
  for folder in (saved, os.path.dirname(saved)):  # the tokenizer folder itself, or the pipeline root
    ours = CLIPTokenizer.from_pretrained_folder(folder)
    assert ours.pad_id == pad_id and ours.vocab_size == 49408
    np.testing.assert_array_equal(ours(texts, 77), expected)
  assert pickle.loads(pickle.dumps(ours))(texts, 77).tolist() == expected.tolist()


def test_tokenizer_json_that_is_not_bpe_is_a_clear_error(tmp_path):
  with open(tmp_path / "tokenizer.json", "w") as f:
    json.dump({"model": {"type": "WordPiece", "vocab": {}}}, f)
  with pytest.raises(ValueError, match="expected a BPE model"):
    CLIPTokenizer.from_pretrained_folder(str(tmp_path))

"""Emoji image–caption set: rendering, captions, the split, the cache, errors, and the pipeline and prepare paths."""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import unicodedata

import numpy as np
import pytest
from PIL import Image

from diffusion_jax.data import emoji, pipeline, prepare, sources
from diffusion_jax.data.records import DataError
from diffusion_jax.data.tokenizers import BytesTokenizer

TOK = BytesTokenizer()
SIZE = 32  # every test that renders uses this size, so the module renders into its cache only once


def _font_or_skip() -> str:
  try:
    return emoji.find_font()
  except DataError:
    pytest.skip(f"needs the colour emoji font: apt-get install {emoji.APT_PACKAGE}")


def _cfg(**overrides):
  cfg = pipeline.default_data_config()
  cfg.update(dict(source="emoji", image_size=SIZE, channels=3))
  cfg.update(overrides)
  return cfg


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  """A private cache root (so tests neither read nor write ~/.cache) where the set is rendered once."""
  _font_or_skip()
  return str(tmp_path_factory.mktemp("emoji_cache"))


@pytest.fixture(scope="module")
def emoji_set(cache_dir):
  return emoji.load_emoji(size=SIZE, cache_dir=cache_dir)


@pytest.fixture(autouse=True)
def _cache_env(request, monkeypatch):
  # Tests of the rendered set reach the module's cache through the environment, as the pipeline does.
  if "cache_dir" in request.fixturenames:
    monkeypatch.setenv("DIFFUSION_JAX_CACHE", request.getfixturevalue("cache_dir"))


def test_renders_over_a_thousand_distinct_captioned_emoji(emoji_set):
  n = len(emoji_set)
  assert n > 1000
  assert emoji_set.images.shape == (n, SIZE, SIZE, 3) and emoji_set.images.dtype == np.uint8
  assert emoji_set.codepoints.dtype == np.int32 and (np.diff(emoji_set.codepoints) > 0).all()
  # Every image shows something on its white background, and no two emoji look the same.
  assert (emoji_set.images.reshape(n, -1).min(axis=1) < 230).all()
  assert len({img.tobytes() for img in emoji_set.images}) == n
  assert len(set(emoji_set.captions)) == n
  for cp, caption in zip(emoji_set.codepoints, emoji_set.captions):
    assert caption == unicodedata.name(chr(cp)).lower()


def test_known_emoji(emoji_set):
  index = {int(cp): i for i, cp in enumerate(emoji_set.codepoints)}
  assert emoji_set.captions[index[0x1F300]] == "cyclone"
  assert emoji_set.captions[index[0x1F302]] == "closed umbrella"
  cyclone = emoji_set.images[index[0x1F300]].astype(int)
  assert cyclone[..., 2].mean() > cyclone[..., 0].mean() + 30  # a blue swirl
  # Codepoints the font has no glyph for are left out rather than rendered as blanks or boxes.
  assert ord("A") not in index and 0x200D not in index and 0xFE0F not in index


def test_split_is_fixed_disjoint_and_about_a_tenth(emoji_set):
  cfg = _cfg()
  train_images, train_captions, train_labels = emoji.load_split(cfg, "train")
  test_images, test_captions, test_labels = emoji.load_split(cfg, "test")
  n = len(emoji_set)
  assert len(train_labels) + len(test_labels) == n
  assert not set(train_labels.tolist()) & set(test_labels.tolist())
  assert sorted(np.concatenate([train_labels, test_labels]).tolist()) == list(range(n))
  assert 0.07 < len(test_labels) / n < 0.13
  # Labels index the whole set, so captions and images agree with it.
  assert test_captions == [emoji_set.captions[i] for i in test_labels]
  np.testing.assert_array_equal(test_images, emoji_set.images[test_labels])
  # Membership depends on the codepoint alone (a CRC-32 rule), so it survives fonts that add or drop emoji.
  assert [hex(cp) for cp in range(0x1F300, 0x1F340) if emoji.is_test(cp)] == ["0x1f320", "0x1f323", "0x1f337"]
  assert "umbrella with rain drops" in test_captions and "cyclone" in train_captions


def test_split_names_follow_the_data_config(emoji_set):
  cfg = _cfg(train_split="fit", eval_split="holdout")
  _, captions, labels = emoji.load_split(cfg, "holdout")
  np.testing.assert_array_equal(labels, emoji.load_split(_cfg(), "test")[2])
  assert len(captions) == len(labels)
  with pytest.raises(DataError, match=re.escape("no split 'test'; expected 'fit' or 'holdout'")) as e:
    emoji.load_split(cfg, "test")
  assert "\n" not in str(e.value)
  with pytest.raises(DataError, match="both 'train'"):
    emoji.load_split(_cfg(eval_split="train"), "train")


def test_rendering_is_deterministic(emoji_set):
  again = emoji.render_emoji(emoji.find_font(), SIZE)
  np.testing.assert_array_equal(again.images, emoji_set.images)
  np.testing.assert_array_equal(again.codepoints, emoji_set.codepoints)
  assert again.captions == emoji_set.captions


def test_second_load_reads_the_cache_without_rendering(emoji_set, cache_dir, monkeypatch):
  def no_render(*args):
    raise AssertionError("re-rendered although the cache matches")

  monkeypatch.setattr(emoji, "render_emoji", no_render)
  cached = emoji.load_emoji(size=SIZE)
  np.testing.assert_array_equal(cached.images, emoji_set.images)
  assert cached.captions == emoji_set.captions
  # Written atomically: only the finished file is left, no temporaries.
  assert sorted(os.listdir(cache_dir)) == [f"emoji_{SIZE}.npz"]


def test_stale_cache_is_re_rendered(emoji_set, tmp_path, monkeypatch):
  cache = str(tmp_path)
  calls = []

  def tiny_render(font_path, size):
    calls.append(size)
    return emoji.EmojiSet(np.zeros((1, size, size, 3), np.uint8), ["x"], np.array([0x1F300], np.int32))

  monkeypatch.setattr(emoji, "render_emoji", tiny_render)
  emoji.load_emoji(size=SIZE, cache_dir=cache)
  emoji.load_emoji(size=SIZE, cache_dir=cache)
  assert calls == [SIZE]
  # Output from older rendering code (or another font, or other Unicode names) is not reused.
  monkeypatch.setattr(emoji, "_FORMAT_VERSION", emoji._FORMAT_VERSION + 1)
  emoji.load_emoji(size=SIZE, cache_dir=cache)
  assert calls == [SIZE, SIZE]
  # A damaged file is re-rendered too, not an error.
  with open(emoji.cache_path(SIZE, cache), "wb") as f:
    f.write(b"not an npz")
  assert emoji.load_emoji(size=SIZE, cache_dir=cache).captions == ["x"]
  assert len(calls) == 3


def test_missing_font_is_one_line_data_error(tmp_path, monkeypatch):
  missing = str(tmp_path / "NoSuchEmoji.ttf")
  with pytest.raises(DataError, match=re.escape(f"emoji font {missing!r} (data.path) does not exist")) as e:
    pipeline.make_dataset(_cfg(path=missing), "train", global_batch_size=2, seed=0)
  assert "\n" not in str(e.value) and emoji.APT_PACKAGE in str(e.value)

  monkeypatch.setattr(emoji, "DEFAULT_FONT_PATHS", (missing,))
  with pytest.raises(DataError, match=re.escape(f"apt-get install {emoji.APT_PACKAGE}`, or set data.path")) as e:
    emoji.load_split(_cfg(), "train")
  assert "\n" not in str(e.value)

  not_a_font = tmp_path / "font.ttf"
  not_a_font.write_text("hello")
  with pytest.raises(DataError, match="cannot load .* as a colour bitmap emoji font"):
    emoji.load_emoji(str(not_a_font), SIZE, cache_dir=str(tmp_path))


def test_pipeline_batches(emoji_set):
  cfg = _cfg(max_text_len=96)  # long enough for every name, so tokens decode to the whole caption
  ds = pipeline.make_dataset(cfg, "test", global_batch_size=8, seed=0, shuffle=False, repeat=False,
                             drop_remainder=False)
  with contextlib.closing(iter(ds)) as it:
    batches = list(it)
  images, captions, labels = emoji.load_split(cfg, "test")
  batch = batches[0]
  assert batch["image"].shape == (8, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
  assert batch["tokens"].shape == (8, 96) and batch["label"].dtype == np.int32
  assert batch["image"].min() >= -1 and batch["image"].max() <= 1 and (batch["valid"] == 1).all()
  np.testing.assert_allclose(batch["image"], images[:8] / 127.5 - 1, atol=1e-6)
  np.testing.assert_array_equal(batch["label"], labels[:8])
  assert TOK.decode(batch["tokens"]) == captions[:8]  # the caption itself, not a class template
  valid = np.concatenate([b["valid"] for b in batches])
  assert valid.sum() == len(labels) and len(valid) == -(-len(labels) // 8) * 8

  train = pipeline.make_dataset(cfg, "train", global_batch_size=4, seed=0)
  with contextlib.closing(iter(train)) as it:
    batch = next(it)
  assert batch["image"].shape == (4, SIZE, SIZE, 3) and not set(batch["label"].tolist()) & set(labels.tolist())


def test_source_pickles_without_pixels(emoji_set):
  source = sources.make_source(_cfg(), "test")
  data = pickle.dumps(source)
  assert len(data) < 4096  # grain workers reload the pixels from the cache instead
  copy = pickle.loads(data)
  assert len(copy) == len(source)
  a, b = source[3], copy[3]
  assert a["caption"] == b["caption"] and a["label"] == b["label"]
  np.testing.assert_array_equal(a["image"], b["image"])


def test_prepare_emoji_matches_the_source(emoji_set, tmp_path, capsys):
  out = str(tmp_path / "emoji_{split}.array_record")
  assert prepare.main(["--source", "emoji", "--split", "test", "--image_size", str(SIZE), "--output", out]) == 0
  _, captions, labels = emoji.load_split(_cfg(), "test")
  assert f"wrote {len(labels)} records" in capsys.readouterr().out
  records = sources.ArrayRecordSource(out, "test")
  assert len(records) == len(labels)
  rec = records[5]
  assert rec["caption"] == captions[5] and rec["label"] == labels[5]
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(rec["image"]))), emoji_set.images[labels[5]])


def test_prepare_emoji_bad_font_exits_2_with_one_line(tmp_path, capsys):
  argv = ["--source", "emoji", "--input", str(tmp_path / "none.ttf"), "--output", str(tmp_path / "x")]
  with pytest.raises(SystemExit) as e:
    prepare.main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "does not exist" in err and err.count("\n") == 1

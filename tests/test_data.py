"""Data pipeline: what the trainer and the sampler rely on, on tiny data written to tmp_path."""
from __future__ import annotations

import contextlib
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from diffusion_jax.data import mnist, pipeline, prepare, records, sources
from diffusion_jax.data.records import DataError
from diffusion_jax.data.tokenizers import BytesTokenizer, get_tokenizer, register_tokenizer

TOK = BytesTokenizer()


def _cfg(**overrides):
  cfg = pipeline.default_data_config()
  cfg.update(overrides)
  return cfg


def _png(pixels: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


def _digit_image(i: int, size: int = 8) -> np.ndarray:
  """A grey image whose pixel values identify `i` and whose left/right halves differ (to see flips)."""
  img = np.full((size, size), (i * 7) % 200, np.uint8)
  img[:, : size // 2] += 50
  return img


def _take(ds, n: int, state=None):
  with contextlib.closing(iter(ds)) as it:
    if state is not None:
      pipeline.set_iterator_state(it, state)
    return [next(it) for _ in range(n)]


def _collect(ds) -> list[dict]:
  with contextlib.closing(iter(ds)) as it:
    return list(it)


def _write_records(path, n: int) -> str:
  """n records with label i and caption 'record i'; returns the file path."""
  out = str(path / "data.array_record")
  records.write_array_record(
      out, (records.encode_record(_digit_image(i), f"record {i}", i) for i in range(n))
  )
  return out


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# --- MNIST -------------------------------------------------------------------------------------------------


def test_mnist_batches_have_contract_shapes_and_matching_captions():
  cfg = _cfg()
  batch = _take(pipeline.make_dataset(cfg, "test", global_batch_size=16, seed=0, shuffle=False), 1)[0]
  assert batch["image"].shape == (16, 32, 32, 1) and batch["image"].dtype == np.float32
  assert batch["tokens"].shape == (16, 32) and batch["tokens"].dtype == np.int32
  assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
  assert batch["valid"].dtype == np.float32 and (batch["valid"] == 1).all()
  assert batch["image"].min() >= -1 and batch["image"].max() <= 1

  images, labels = mnist.load_mnist("test")
  np.testing.assert_array_equal(batch["label"], labels[:16])
  # 28x28 is zero-padded by 2 px on each side, not resized: the digit's pixels survive exactly.
  np.testing.assert_allclose(batch["image"][0, 2:30, 2:30, 0], images[0] / 127.5 - 1, atol=1e-6)
  assert (batch["image"][:, :2] == -1).all() and (batch["image"][:, :, 30:] == -1).all()
  expected = [f"a handwritten digit {mnist.CLASS_NAMES[l]}" for l in labels[:16]]
  assert TOK.decode(batch["tokens"]) == expected


def test_mnist_resized_to_rgb():
  cfg = _cfg(image_size=16, channels=3)
  batch = _take(pipeline.make_dataset(cfg, "test", global_batch_size=4, seed=0), 1)[0]
  assert batch["image"].shape == (4, 16, 16, 3)
  np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])
  assert batch["image"].max() > 0.5  # a downscaled digit still has bright strokes


def test_training_draws_templates_eval_uses_first():
  templates = ("a handwritten digit {name}", "the number {name}", "digit {label}")
  cfg = _cfg(caption_templates=templates)
  train = _take(pipeline.make_dataset(cfg, "train", global_batch_size=64, seed=1), 1)[0]
  texts = TOK.decode(train["tokens"])
  starts = {t.split(" ")[0] for t in texts}
  assert starts == {"a", "the", "digit"}
  for text, label in zip(texts, train["label"]):
    assert text in {t.format(name=mnist.CLASS_NAMES[label], label=label) for t in templates}
  test = _take(pipeline.make_dataset(cfg, "test", global_batch_size=64, seed=1), 1)[0]
  assert TOK.decode(test["tokens"]) == [f"a handwritten digit {mnist.CLASS_NAMES[l]}" for l in test["label"]]


def test_prompts_for_labels():
  assert pipeline.prompts_for_labels(_cfg(), [7, 0]) == ["a handwritten digit seven", "a handwritten digit zero"]


# --- sharding, shuffling, resuming -------------------------------------------------------------------------


def test_processes_get_disjoint_shards_covering_one_epoch(tmp_path):
  cfg = _cfg(source="array_record", path=_write_records(tmp_path, 21), image_size=8)
  kw = dict(global_batch_size=4, seed=3, repeat=False, drop_remainder=False)

  def labels_of(batches):
    return [int(l) for b in batches for l, v in zip(b["label"], b["valid"]) if v]

  single = labels_of(_collect(pipeline.make_dataset(cfg, "train", **kw)))
  assert sorted(single) == list(range(21))
  shards = [_collect(pipeline.make_dataset(cfg, "train", process_index=i, process_count=2, **kw)) for i in (0, 1)]
  # 21 examples padded to 24 = 6 batches of 2 per process; the padding is invalid.
  assert [len(s) for s in shards] == [6, 6]
  assert all(b["image"].shape == (2, 8, 8, 1) for s in shards for b in s)
  p0, p1 = labels_of(shards[0]), labels_of(shards[1])
  assert not set(p0) & set(p1)
  assert sorted(p0 + p1) == list(range(21))
  # Stacking the processes' rows rebuilds the single-process global batches in order, so per-row random
  # draws (noise, time steps) and hence losses do not depend on the number of processes.
  whole = _collect(pipeline.make_dataset(cfg, "train", **kw))
  for g, b0, b1 in zip(whole, *shards):
    np.testing.assert_array_equal(np.concatenate([b0["label"], b1["label"]]), g["label"])
    np.testing.assert_array_equal(np.concatenate([b0["image"], b1["image"]]), g["image"])

  # drop_remainder cuts the epoch to whole global batches instead.
  cut = _collect(pipeline.make_dataset(cfg, "train", **{**kw, "drop_remainder": True}))
  assert len(cut) == 5 and all(b["valid"].all() for b in cut)


def test_shuffle_is_deterministic_per_seed(tmp_path):
  cfg = _cfg(source="array_record", path=_write_records(tmp_path, 16), image_size=8)

  def order(seed, shuffle=True):
    ds = pipeline.make_dataset(cfg, "train", global_batch_size=16, seed=seed, shuffle=shuffle, repeat=False)
    return _collect(ds)[0]["label"].tolist()

  assert order(0) == order(0)
  assert order(0) != order(1)
  assert sorted(order(0)) == list(range(16))
  assert order(0, shuffle=False) == list(range(16))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_gives_the_batches_of_an_uninterrupted_run(tmp_path, num_workers):
  # Two templates and random flips: resuming must reproduce the random choices too. 10 examples in batches
  # of 4 cross epoch boundaries, where the shuffle is reseeded.
  path = _write_records(tmp_path, 10)
  reference_cfg = _cfg(source="array_record", path=path, image_size=8, random_flip=True,
                       caption_templates=("x {name}", "y {name}"))
  cfg = _cfg(**{**reference_cfg.to_dict(), "num_workers": num_workers})
  kw = dict(global_batch_size=4, seed=5)
  reference = _take(pipeline.make_dataset(reference_cfg, "train", **kw), 6)

  with contextlib.closing(iter(pipeline.make_dataset(cfg, "train", **kw))) as it:
    first = [next(it) for _ in range(2)]
    state = json.loads(json.dumps(pipeline.get_iterator_state(it)))  # as stored in a checkpoint
    next(it)  # the interrupted run went on a little before dying
  _assert_batches_equal(first, reference[:2])
  resumed = _take(pipeline.make_dataset(cfg, "train", **kw), 4, state=state)
  _assert_batches_equal(resumed, reference[2:])


def test_random_flip_flips_some_examples_only_in_training(tmp_path):
  cfg = _cfg(source="array_record", path=_write_records(tmp_path, 32), image_size=8, random_flip=True)
  kw = dict(global_batch_size=32, seed=0, shuffle=False, repeat=False)
  plain = _collect(pipeline.make_dataset(_cfg(**{**cfg.to_dict(), "random_flip": False}), "train", **kw))[0]
  flipped = _collect(pipeline.make_dataset(cfg, "train", **kw))[0]
  same = [np.array_equal(a, b) for a, b in zip(plain["image"], flipped["image"])]
  mirrored = [np.array_equal(a[:, ::-1], b) for a, b in zip(plain["image"], flipped["image"])]
  assert all(s != m for s, m in zip(same, mirrored)) and 0 < sum(mirrored) < 32
  evaluated = _collect(pipeline.make_dataset(cfg, "test", **kw))[0]
  _assert_batches_equal([evaluated], [plain])


def test_batch_size_must_divide_across_processes():
  with pytest.raises(ValueError, match="multiple of process_count 3"):
    pipeline.make_dataset(_cfg(), "test", global_batch_size=8, seed=0, process_count=3)


# --- bad records and bad datasets --------------------------------------------------------------------------


def _write_folder(root, rows, images):
  root.mkdir(parents=True, exist_ok=True)
  for name, data in images.items():
    (root / name).write_bytes(data)
  with open(root / "captions.jsonl", "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  return str(root)


def _mixed_folder(root):
  """Six rows: 0-2 captioned, 3 corrupt PNG, 4 no caption and no label, 5 label only (caption from template)."""
  images = {f"{i}.png": _png(np.stack([_digit_image(i, 12)] * 3, -1)) for i in range(6)}
  images["3.png"] = images["3.png"][:40]  # a truncated file: valid header, missing pixel data
  rows = [{"file": f"{i}.png", "caption": f"photo {i} ☕"} for i in range(3)]
  rows += [{"file": "3.png", "caption": "broken"}, {"file": "4.png"}, {"file": "5.png", "label": 5}]
  return _write_folder(root, rows, images)


def test_image_folder_marks_corrupt_and_uncaptioned_records_invalid(tmp_path):
  cfg = _cfg(source="image_folder", path=_mixed_folder(tmp_path / "imgs"), image_size=8, channels=3)
  batch = _collect(pipeline.make_dataset(cfg, "test", global_batch_size=6, seed=0, shuffle=False, repeat=False))[0]
  np.testing.assert_array_equal(batch["valid"], [1, 1, 1, 0, 0, 1])
  assert batch["image"].shape == (6, 8, 8, 3)
  assert (batch["image"][3:5] == 0).all() and (batch["tokens"][3:5] == 0).all()
  assert TOK.decode(batch["tokens"][[0, 5]]) == ["photo 0 ☕", "a handwritten digit five"]
  np.testing.assert_array_equal(batch["label"], [-1, -1, -1, -1, -1, 5])


def test_image_folder_uses_split_subfolder_and_csv(tmp_path):
  (tmp_path / "train").mkdir()
  (tmp_path / "train" / "a.png").write_bytes(_png(_digit_image(1, 40)[:, :30]))  # 40x30: resize + crop
  (tmp_path / "train" / "captions.csv").write_text('file,caption\na.png,"a cat, sitting"\n', encoding="utf-8")
  cfg = _cfg(source="image_folder", path=str(tmp_path), image_size=16)
  batch = _collect(pipeline.make_dataset(cfg, "train", global_batch_size=1, seed=0, repeat=False))[0]
  assert batch["image"].shape == (1, 16, 16, 1) and batch["valid"][0] == 1
  assert TOK.decode(batch["tokens"]) == ["a cat, sitting"]


def test_corrupt_array_record_is_invalid_not_fatal(tmp_path):
  path = str(tmp_path / "bad.array_record")
  good = records.encode_record(_digit_image(1), "one", 1)
  records.write_array_record(path, [good, b"\x00not msgpack", records.encode_record(b"\x89PNG\r\n\x1a\nxx", "x")])
  cfg = _cfg(source="array_record", path=path, image_size=8)
  batch = _collect(pipeline.make_dataset(cfg, "train", global_batch_size=3, seed=0, shuffle=False, repeat=False))[0]
  np.testing.assert_array_equal(batch["valid"], [1, 0, 0])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(source="image_folder", path="{tmp}/empty"), "has neither captions.jsonl nor captions.csv"),
        (dict(source="image_folder", path="{tmp}/nothing_listed"), "lists no images"),
        (dict(source="image_folder", path="{tmp}/missing"), "'{tmp}/missing' does not exist"),
        (dict(source="array_record", path="{tmp}/missing.array_record"), "no ArrayRecord file matches"),
        (dict(source="array_record", path="{tmp}/*_{split}.array_record"), "'{tmp}/*_test.array_record'"),
        (dict(source="array_record", path="{tmp}/empty.array_record"), "holds no records"),
        (dict(source="webdataset"), "unknown data.source 'webdataset'"),
        (dict(source="mnist"), "MNIST has no split 'dev'"),
    ],
)
def test_unusable_datasets_raise_data_error(tmp_path, overrides, message):
  (tmp_path / "empty").mkdir()
  (tmp_path / "nothing_listed").mkdir()
  (tmp_path / "nothing_listed" / "captions.jsonl").write_text("\n")
  records.write_array_record(str(tmp_path / "empty.array_record"), [])
  cfg = _cfg(**{k: v.replace("{tmp}", str(tmp_path)) for k, v in overrides.items()})
  split = "dev" if overrides["source"] == "mnist" else "test"
  with pytest.raises(DataError, match=re.escape(message.replace("{tmp}", str(tmp_path)))) as e:
    pipeline.make_dataset(cfg, split, global_batch_size=2, seed=0)
  assert "\n" not in str(e.value)


# --- records, prepare, tfds --------------------------------------------------------------------------------


def test_record_round_trip_and_garbage():
  pixels = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
  rec = records.decode_record(records.encode_record(pixels, "ünïcode 🐍", 3))
  assert rec["caption"] == "ünïcode 🐍" and rec["label"] == 3
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(rec["image"]))), pixels)
  with pytest.raises(records.CorruptRecordError):
    records.decode_record(b"\x93\x01\x02")
  with pytest.raises(ValueError, match="PNG or JPEG"):
    records.encode_record(b"GIF89a", "x")


def test_prepare_folder_round_trip(tmp_path, capsys):
  folder = _mixed_folder(tmp_path / "imgs")
  out = str(tmp_path / "out" / "{split}.array_record")
  assert prepare.main(["--source", "image_folder", "--input", folder, "--split", "test", "--output", out]) == 0
  printed = capsys.readouterr().out
  assert "wrote 4 records" in printed and "skipped 1 corrupt and 1 with neither caption nor label" in printed

  kw = dict(global_batch_size=4, seed=0, shuffle=False, repeat=False)
  from_records = _collect(
      pipeline.make_dataset(_cfg(source="array_record", path=out, channels=3), "test", **kw))[0]
  from_folder = _collect(
      pipeline.make_dataset(_cfg(source="image_folder", path=folder, channels=3), "test",
                            **{**kw, "global_batch_size": 6}))[0]
  good = np.flatnonzero(from_folder["valid"])
  for key in ("image", "tokens", "label", "valid"):
    np.testing.assert_array_equal(from_records[key], from_folder[key][good], err_msg=key)


def test_prepare_mnist(tmp_path):
  out = str(tmp_path / "mnist_test.array_record")
  assert prepare.main(["--source", "mnist", "--split", "test", "--output", out, "--limit", "5"]) == 0
  source = sources.ArrayRecordSource(out, "test")
  images, labels = mnist.load_mnist("test")
  assert len(source) == 5
  for i in range(5):
    rec = source[i]
    assert rec["label"] == labels[i] and rec["caption"] == ""
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(rec["image"]))), images[i])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--source", "coco", "--output", "x"], "invalid choice: 'coco'"),
        (["--source", "image_folder", "--output", "x"], "needs --input DIR"),
        (["--source", "image_folder", "--input", "/no/such/dir", "--output", "x"], "'/no/such/dir' does not exist"),
        (["--source", "mnist", "--output", "x", "--limit", "many"], "invalid int value"),
    ],
)
def test_prepare_bad_arguments_exit_2_with_one_line(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    prepare.main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert message in err and err.count("\n") == 1


def test_tfds_source_via_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  cfg = _cfg(source="tfds", tfds_name="mnist")
  with tfds.testing.mock_data(num_examples=6):
    batches = _collect(pipeline.make_dataset(cfg, "train", global_batch_size=3, seed=0, repeat=False))
  assert len(batches) == 2
  for b in batches:
    assert b["image"].shape == (3, 32, 32, 1) and (b["valid"] == 1).all()
    assert ((0 <= b["label"]) & (b["label"] < 10)).all()
    assert TOK.decode(b["tokens"]) == [f"a handwritten digit {mnist.CLASS_NAMES[l]}" for l in b["label"]]
  with tfds.testing.mock_data(num_examples=6):
    with pytest.raises(DataError, match="has no feature 'caption'"):
      pipeline.make_dataset(_cfg(source="tfds", tfds_name="mnist", tfds_caption_key="caption"), "train",
                            global_batch_size=3, seed=0)


# --- tokenizer ---------------------------------------------------------------------------------------------


def test_bytes_tokenizer_layout_truncation_and_unicode():
  tok = get_tokenizer("bytes")
  assert (tok.vocab_size, tok.pad_id) == (259, 0)
  ids = tok(["hi", ""], 6)
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, [[1, ord("h") + 3, ord("i") + 3, 2, 0, 0], [1, 2, 0, 0, 0, 0]])
  long = tok(["abcdefghij"], 5)[0]
  np.testing.assert_array_equal(long, [1, ord("a") + 3, ord("b") + 3, ord("c") + 3, 2])
  text = "naïve 🦊 日本"
  assert tok.decode(tok([text], 64)) == [text]
  # An emoji cut in half by truncation still ends in EOT and decodes without raising.
  cut = tok(["🦊🦊"], 4)[0]
  assert cut[-1] == 2 and tok.decode(cut) == ["\ufffd"]


def test_tokenizer_registry():
  register_tokenizer("test_upper_bytes", BytesTokenizer)
  assert isinstance(get_tokenizer("test_upper_bytes"), BytesTokenizer)
  with pytest.raises(ValueError, match="already registered"):
    register_tokenizer("bytes", lambda: None)
  with pytest.raises(ValueError, match="unknown data.tokenizer 'no_such_tokenizer'"):
    get_tokenizer("no_such_tokenizer")


def test_iterator_state_is_json_and_checked():
  ds = pipeline.make_dataset(_cfg(), "test", global_batch_size=2, seed=0)
  with contextlib.closing(iter(ds)) as it:
    next(it)
    state = pipeline.get_iterator_state(it)
    assert json.loads(json.dumps(state)) == state
    with pytest.raises(ValueError, match="not a data iterator state"):
      pipeline.set_iterator_state(it, {"next_index": 3})


def test_hashed_word_tokenizer_is_one_token_per_word_and_stable():
  tok = get_tokenizer("words")
  ids = tok(["A handwritten digit Seven!", "a handwritten digit seven", "a handwritten digit one"], 8)
  assert ids.dtype == np.int32 and ids.shape == (3, 8)
  np.testing.assert_array_equal(ids[0], ids[1])  # case and punctuation do not matter
  assert list(ids[0, [0, 5]]) == [tok.sot_id, tok.eot_id] and list(ids[0, 6:]) == [0, 0]
  assert ids[0, 4] != ids[2, 4] and list(ids[0, 1:4]) == list(ids[2, 1:4])
  assert ids[0, 4] == 3 + __import__("zlib").crc32(b"seven") % (tok.vocab_size - 3)  # stable across runs
  long = tok([" ".join(["word"] * 20)], 6)[0]
  assert long[-1] == tok.eot_id and np.all(long[1:-1] >= 3)

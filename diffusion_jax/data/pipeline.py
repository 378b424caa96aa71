"""Builds the per-process grain pipeline that feeds the trainer, and saves/restores its position.

source -> shuffle(seed) -> repeat | fit one epoch to whole global batches -> decode/fit/flip/caption/tokenise
-> this process's rows of each global batch -> batch -> iterator (threads, or `num_workers` processes).

Random transforms run *before* the per-process slice: their generator depends on the position in the global
stream, so an example is augmented the same way whatever the number of processes.
"""
from __future__ import annotations

import base64
import os
import threading
import time
from collections.abc import Callable, Sequence

import grain
import ml_collections
import msgpack
import numpy as np

from diffusion_jax.data import mnist, transforms
from diffusion_jax.data.records import DataError
from diffusion_jax.data.sources import make_source, unreadable_example
from diffusion_jax.data.tokenizers import get_tokenizer

__all__ = [
    "DataError",
    "default_data_config",
    "derived_seed",
    "get_iterator_state",
    "make_array_dataset",
    "make_rows_dataset",
    "make_dataset",
    "prompts_for_labels",
    "set_iterator_state",
]

_STATE_FORMAT = "grain-msgpack-base64-v1"
# Threads per process computing whole batches ahead of the trainer; a few batches hide decode latency without
# holding much memory (grain's default buffer of 500 elements would be 500 *batches* here).
_READ_OPTIONS = dict(num_threads=4, prefetch_buffer_size=4)


def default_data_config() -> ml_collections.ConfigDict:
  """The `data` section every config starts from (MNIST, 32x32 grey, byte tokens)."""
  return ml_collections.ConfigDict(
      dict(
          source="mnist",  # 'mnist' | 'array_record' | 'tfds' | 'image_folder' | 'emoji' | 'conversations'
          path="",  # ArrayRecord file/glob/comma list ({split} filled in), image folder, or TFDS data_dir
          tfds_name="",
          tfds_caption_key="",  # '' -> captions come from the label and caption_templates
          train_split="train",
          eval_split="test",
          image_size=32,
          channels=1,
          random_flip=False,
          caption_templates=("a handwritten digit {name}",),
          class_names=tuple(mnist.CLASS_NAMES),
          tokenizer="bytes",
          max_text_len=32,
          image_folder="",  # images of 'conversations' records are relative to it ('': the data file's folder)
          num_workers=0,  # 0: in-process threads; >0: that many grain worker processes
      )
  )


def derived_seed(seed: int, purpose: str) -> int:
  # Each random step gets its own stream: two RandomMaps on one seed would draw identical numbers per index,
  # e.g. tying the flip to the template choice.
  tag = int.from_bytes(purpose.encode(), "little")
  return int(np.random.SeedSequence([seed, tag]).generate_state(1)[0])


class _PadToLength(grain.MapDataset):
  """Appends unreadable examples up to `length`, so a finite epoch fills whole global batches (valid=0)."""

  def __init__(self, parent: grain.MapDataset, length: int):
    super().__init__(parent)
    self._length = length
    self._parent_length = len(parent)

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    index %= self._length
    return self._parent[index] if index < self._parent_length else unreadable_example()

  def __str__(self) -> str:
    return f"_PadToLength({self._length})"


class _RowsOfGlobalBatches(grain.MapDataset):
  """This process's contiguous block of rows in every global batch.

  Process i of n takes rows [i*b, (i+1)*b) of each global batch of n*b examples, so the global batch assembled
  from all processes holds the same examples *in the same order* as a single process would read: per-row random
  draws (noise, time steps) then match too, and a run's losses do not depend on how many hosts feed it.
  """

  def __init__(self, parent: grain.MapDataset, local_batch: int, process_index: int, process_count: int):
    super().__init__(parent)
    self._local, self._index, self._count = local_batch, process_index, process_count
    self._length = len(parent) // (local_batch * process_count) * local_batch

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    batch, row = divmod(index % self._length, self._local)
    return self._parent[(batch * self._count + self._index) * self._local + row]

  def __str__(self) -> str:
    return f"_RowsOfGlobalBatches(process {self._index} of {self._count}, {self._local} rows)"


def _whole_batches(ds: grain.MapDataset, global_batch_size: int, drop_remainder: bool) -> grain.MapDataset:
  """One epoch cut or padded to whole global batches.

  Every process then gets the same number of batches; otherwise the process with one batch more would wait
  forever in a collective the others never join.
  """
  n = len(ds)
  if drop_remainder:
    kept = n - n % global_batch_size
    if kept == 0:
      raise DataError(f"the dataset has {n} examples, fewer than one global batch of {global_batch_size}")
    return ds[:kept] if kept < n else ds
  padded = -(-n // global_batch_size) * global_batch_size
  return _PadToLength(ds, padded) if padded > n else ds


def make_dataset(
    data_cfg: ml_collections.ConfigDict,
    split: str,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool = True,
    repeat: bool = True,
    drop_remainder: bool = True,
    examples: Callable[[grain.MapDataset, ml_collections.ConfigDict, bool, int], grain.MapDataset] | None = None,
) -> grain.IterDataset:
  """This process's batches: dicts of numpy 'image' f32 [b,S,S,C], 'tokens' i32 [b,L], 'label', 'valid'.

  b = global_batch_size // process_count. Without `repeat` the epoch is cut to whole global batches, or with
  `drop_remainder=False` padded with valid=0 examples, so every batch is full and every process gets as many.
  Every split but `data.eval_split` is treated as training: random caption template, and flips if enabled.
  `examples(ds, data_cfg, training, seed)` turns decoded images and their records into model rows in place of
  the caption → tokens stage (a vision–language task's conversations, `data.conversations`).
  """
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
        f"global_batch_size {global_batch_size} must be a positive multiple of process_count {process_count}"
    )
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is outside [0, {process_count})")
  if data_cfg.num_workers < 0:
    raise ValueError(f"data.num_workers must be >= 0, got {data_cfg.num_workers}")
  local_batch = global_batch_size // process_count
  training = split != data_cfg.eval_split

  ds = grain.MapDataset.source(make_source(data_cfg, split))
  if shuffle:
    ds = ds.shuffle(seed=seed)
  # repeat() reshuffles every epoch with a seed derived from `seed`.
  ds = ds.repeat() if repeat else _whole_batches(ds, global_batch_size, drop_remainder)
  ds = ds.map(transforms.DecodeImage(data_cfg.channels)).map(transforms.FitImage(data_cfg.image_size))
  if data_cfg.random_flip and training:
    ds = ds.random_map(transforms.RandomFlip(), seed=derived_seed(seed, "flip"))
  ds = (examples or _captioned)(ds, data_cfg, training, seed)
  ds = _RowsOfGlobalBatches(ds, local_batch, process_index, process_count)
  ds = ds.batch(local_batch, drop_remainder=True)

  it = ds.to_iter_dataset(grain.ReadOptions(**_READ_OPTIONS))
  if data_cfg.num_workers > 0:
    it = it.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(num_workers=data_cfg.num_workers),
                        worker_init_fn=ExitWithParent(os.getpid()))
    it = it.map(transforms.CopyToNumpy())
  return it


def _captioned(ds: grain.MapDataset, data_cfg, training: bool, seed: int) -> grain.MapDataset:
  """Records → {'image', 'tokens', 'label', 'valid'}: a caption (or a template of the class name), tokenised."""
  caption = transforms.ChooseCaption(data_cfg.caption_templates, data_cfg.class_names, randomize=training)
  ds = ds.random_map(caption, seed=derived_seed(seed, "caption"))
  ds = ds.map(transforms.Tokenize(get_tokenizer(data_cfg.tokenizer), data_cfg.max_text_len))
  return ds.map(transforms.ToModelInputs(data_cfg.image_size, data_cfg.channels, data_cfg.max_text_len))


class ExitWithParent:
  """grain `worker_init_fn`: the worker exits within `poll_s` seconds of its parent's death.

  grain's workers are daemonic children, which Python ends only when the parent exits normally; a parent killed by
  SIGKILL (an OOM kill, a preempted job) leaves them running, each holding its dataset copy (about 0.4 GB) for as
  long as they run. grain 0.2.18 offers nothing for this, only this init hook, run in each worker. A thread
  watching the parent pid is used rather than prctl(PR_SET_PDEATHSIG): that signal follows the *thread* that started
  the worker, and grain starts them from its prefetch threads, not the main thread, so it could also kill workers
  of a healthy parent.
  """

  def __init__(self, parent_pid: int, poll_s: float = 0.5):
    self.parent_pid, self.poll_s = parent_pid, poll_s

  def __call__(self, worker_index: int, worker_count: int) -> None:
    del worker_index, worker_count
    threading.Thread(target=self._watch, name="exit-with-parent", daemon=True).start()

  def _watch(self) -> None:
    # An orphan is re-parented (to init or a subreaper), so its parent pid changes when the parent dies.
    while os.getppid() == self.parent_pid:
      time.sleep(self.poll_s)
    os._exit(1)  # no cleanup: the parent that would read its output is gone


def make_array_dataset(arrays: dict[str, np.ndarray], *, global_batch_size: int, seed: int, process_index: int = 0,
                       process_count: int = 1) -> grain.IterDataset:
  """This process's batches of rows of in-memory `arrays` (equal first dimension), shuffled and repeated.

  For data a task makes itself (e.g. reflow's (noise, sample) pairs): the same global-batch row layout,
  per-epoch reshuffling and checkpointable iterator position as `make_dataset`.
  """
  sizes = {k: len(v) for k, v in arrays.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"arrays must have the same number of rows, got {sizes}")
  return make_rows_dataset(_ArrayRows(arrays), global_batch_size=global_batch_size, seed=seed,
                           process_index=process_index, process_count=process_count)


class _ArrayRows:
  """Row i of every array, as a dict (a random-access source for `make_rows_dataset`)."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self._arrays = arrays

  def __len__(self) -> int:
    return len(next(iter(self._arrays.values())))

  def __getitem__(self, index: int) -> dict:
    return {k: v[index] for k, v in self._arrays.items()}


def make_rows_dataset(source, *, global_batch_size: int, seed: int, process_index: int = 0,
                      process_count: int = 1) -> grain.IterDataset:
  """This process's batches of a random-access `source` whose items are ready model rows (dicts of arrays).

  Shuffled with `seed` and repeated exactly as `make_dataset` orders its source, so a source holding the same
  examples in the same order (e.g. their cached VAE latents) yields the same batches.
  """
  n = len(source)
  if n < global_batch_size:
    raise DataError(f"{n} examples are fewer than one global batch of {global_batch_size}")
  local_batch = global_batch_size // process_count
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  ds = _RowsOfGlobalBatches(ds, local_batch, process_index, process_count)
  ds = ds.batch(local_batch, drop_remainder=True)
  return ds.to_iter_dataset(grain.ReadOptions(**_READ_OPTIONS))


def _plain(obj):
  # grain states hold ints, strings, lists and dicts, occasionally numpy scalars.
  if isinstance(obj, np.generic):
    return obj.item()
  raise TypeError(f"cannot serialise {type(obj).__name__} in a grain iterator state")


def get_iterator_state(it) -> dict:
  """The iterator's position as a JSON-safe dict, for the trainer to store in its checkpoint.

  grain's state is a nested dict that may carry int keys (the multi-process interleave's `future_states`),
  which JSON would silently turn into strings; msgpack keeps it exact and base64 makes it JSON text.
  """
  packed = msgpack.packb(it.get_state(), default=_plain, use_bin_type=True)
  return {"format": _STATE_FORMAT, "state": base64.b64encode(packed).decode("ascii")}


def set_iterator_state(it, state: dict) -> None:
  """Moves `it` (from `iter(make_dataset(...))` with the same arguments) to a position saved earlier."""
  if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
    raise ValueError(f"not a data iterator state from get_iterator_state (expected format {_STATE_FORMAT!r})")
  raw = msgpack.unpackb(base64.b64decode(state["state"]), raw=False, strict_map_key=False)
  it.set_state(raw)


def prompts_for_labels(data_cfg: ml_collections.ConfigDict, labels: Sequence[int],
                       template: str | None = None) -> list[str]:
  """Evaluation prompts for class labels, e.g. 7 -> 'a handwritten digit seven' (default: the first caption template;
  another `template` phrases them in words the training captions never used)."""
  template = template or data_cfg.caption_templates[0]
  return [transforms.fill_template(template, int(label), data_cfg.class_names) for label in np.ravel(labels)]


def label_prompts(data_cfg: ml_collections.ConfigDict, per_class: int,
                  template: str = "") -> tuple[list[str], np.ndarray]:
  """`per_class` prompts for every class in order, and their int32 labels: what a class-conditional evaluation
  draws (`prompts_for_labels`' phrasing)."""
  labels = np.repeat(np.arange(len(data_cfg.class_names)), per_class).astype(np.int32)
  return prompts_for_labels(data_cfg, labels, template or None), labels

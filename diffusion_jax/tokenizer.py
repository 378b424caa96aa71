"""The CLIP byte-level BPE tokenizer, id-for-id compatible with `open_clip.tokenize`.

Pretrained CLIP text towers (and Stable Diffusion's text encoder) only understand the ids they were trained
on, so this reimplements open_clip's tokenizer exactly instead of approximating it, but without torch: the
data pipeline runs in grain workers that should not import a deep-learning framework just to split words.

The vocabulary is read offline: by default from the `bpe_simple_vocab_16e6.txt.gz` merge file this package ships
(`diffusion_jax/assets/`, MIT-licensed, the same file open_clip ships, so `pip install -e .` alone runs every
config), or from a Stable Diffusion / transformers folder's `vocab.json` + `merges.txt` (or `tokenizer.json`) via
`from_pretrained_folder`.

Importing this module registers the tokenizer as `data.tokenizer='clip'`.
"""
from __future__ import annotations

import gzip
import html
import json
import os
from collections.abc import Sequence

import numpy as np
import regex

from diffusion_jax.data.tokenizer_interface import check_tokenizer_call
from diffusion_jax.data.tokenizers import register_tokenizer

try:  # ftfy repairs mojibake; open_clip uses it when present, so parity needs it too when installed.
  import ftfy
except ImportError:  # pragma: no cover - depends on the environment
  ftfy = None

DEFAULT_CONTEXT_LENGTH = 77
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# CLIP's merge table is cut to this many entries so that 256 bytes x2 (+ "</w>") + merges + 2 specials = 49408.
_NUM_MERGES = 49152 - 256 - 2
# Contractions, letter runs, single digits, and runs of other non-space symbols: the split CLIP was trained
# with. \p{L} / \p{N} are why the `regex` package is needed rather than `re`.
_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _bytes_to_unicode() -> dict[int, str]:
  """A reversible byte -> printable character table, so BPE never has to handle spaces or control bytes.

  Printable Latin-1 bytes map to themselves; the rest are shifted to code points 256+ in byte order. The
  exact order matters: it defines ids 0..511 of the CLIP vocabulary.
  """
  keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  table = {b: chr(b) for b in keep}
  rest = [b for b in range(256) if b not in table]
  table.update({b: chr(256 + n) for n, b in enumerate(rest)})
  return table


def default_bpe_path() -> str:
  """The CLIP BPE merge file bundled with this package (see assets/LICENSE-bpe_simple_vocab_16e6.txt)."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", _BPE_FILE)


def _token_name(value) -> str | None:
  """Special-token entries are either plain strings or transformers' AddedToken dicts ({"content": ...})."""
  if isinstance(value, dict):
    return value.get("content")
  return value


def _has_tokenizer_files(folder: str) -> bool:
  return any(os.path.isfile(os.path.join(folder, name)) for name in ("vocab.json", "tokenizer.json"))


def _read_vocab_and_merges(folder: str) -> tuple[dict[str, int], list[str]]:
  vocab_file = os.path.join(folder, "vocab.json")
  merges_file = os.path.join(folder, "merges.txt")
  for required in (vocab_file, merges_file):
    if not os.path.isfile(required):
      raise FileNotFoundError(f"CLIP tokenizer file not found: {required} (a tokenizer folder needs vocab.json + "
                              f"merges.txt, or tokenizer.json)")
  with open(vocab_file, encoding="utf-8") as f:
    encoder = json.load(f)
  with open(merges_file, encoding="utf-8") as f:
    lines = f.read().strip().split("\n")
  if lines and lines[0].startswith("#version"):
    lines = lines[1:]
  return encoder, lines


def _read_tokenizer_json(path: str) -> tuple[dict[str, int], list[str]]:
  """Vocabulary and merges ("a b" lines) of a `tokenizers` BPE model file."""
  with open(path, encoding="utf-8") as f:
    try:
      model = json.load(f).get("model") or {}
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON: {e}") from None
  if model.get("type") != "BPE" or "vocab" not in model or "merges" not in model:
    raise ValueError(f"{path}: expected a BPE model with vocab and merges (a CLIP tokenizer), "
                     f"found type {model.get('type')!r}")
  if model.get("end_of_word_suffix", "</w>") != "</w>":
    raise ValueError(f"{path}: end_of_word_suffix is {model['end_of_word_suffix']!r}, not CLIP's '</w>'")
  # tokenizers < 0.20 writes merges as "a b" strings, later versions as ["a", "b"] pairs.
  merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
  return dict(model["vocab"]), merges


def write_vocab_and_merges(folder: str) -> tuple[str, str]:
  """Writes the bundled BPE as the vocab.json + merges.txt of a Hugging Face CLIP tokenizer folder (what Stable
  Diffusion ships: the same ids, <|startoftext|> / <|endoftext|> at 49406 / 49407), so that transformers'
  `CLIPTokenizer` can be built offline, e.g. for test and benchmark pipelines. Returns the two paths."""
  with gzip.open(default_bpe_path(), "rt", encoding="utf-8") as f:
    merges = f.read().split("\n")[1: _NUM_MERGES + 1]
  vocab = {k: v for k, v in CLIPTokenizer().encoder.items() if k not in ("<start_of_text>", "<end_of_text>")}
  vocab.update({"<|startoftext|>": 49406, "<|endoftext|>": 49407})
  os.makedirs(folder, exist_ok=True)
  paths = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
  with open(paths[0], "w", encoding="utf-8") as f:
    json.dump(vocab, f)
  with open(paths[1], "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
  return paths


class CLIPTokenizer:
  """CLIP BPE tokenizer: `tok(texts, context_length)` -> int32 [N, context_length].

  Rows are [SOT, tokens..., EOT, pad...]; over-long texts are cut so EOT is still the last token, because CLIP
  pools the text embedding at the EOT position.
  """

  def __init__(self, bpe_path: str | None = None):
    path = bpe_path if bpe_path is not None else default_bpe_path()
    if not os.path.isfile(path):
      raise FileNotFoundError(f"CLIP BPE vocabulary file not found: {path}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
      lines = f.read().split("\n")
    # Line 0 is a version header; the vocabulary is derived from the merges, so ids depend on this exact cut.
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<start_of_text>", "<end_of_text>"]
    encoder = {tok: i for i, tok in enumerate(vocab)}
    self._setup(encoder, merges, "<start_of_text>", "<end_of_text>", pad_id=0, unescape_html=True)

  def _setup(self, encoder, merges, sot: str, eot: str, pad_id: int, unescape_html: bool) -> None:
    """Shared state for both vocabulary sources; kept small so pickling for grain workers stays simple."""
    self.encoder = encoder
    self.merges = list(merges)
    self.sot_token, self.eot_token = sot, eot
    self.sot_id = encoder[sot]
    self.eot_id = encoder[eot]
    self.pad_id = int(pad_id)
    # The two sources clean differently: open_clip html-unescapes, transformers' CLIPTokenizer does not.
    self.unescape_html = unescape_html
    self.vocab_size = len(encoder)
    self._build()

  def _build(self) -> None:
    """Derived lookups, rebuilt after unpickling rather than shipped (the compiled regex and word cache)."""
    self._byte_encoder = _bytes_to_unicode()
    self._ranks = {m: i for i, m in enumerate(self.merges)}
    # Special tokens first, so a literal "<end_of_text>" in a caption maps to its id as open_clip does.
    specials = "|".join(regex.escape(t) for t in (self.sot_token, self.eot_token))
    self._pattern = regex.compile(specials + "|" + _WORD_PATTERN, regex.IGNORECASE)
    # Per-word BPE cache: captions repeat words constantly and merging is the slow part.
    self._cache = {self.sot_token: self.sot_token, self.eot_token: self.eot_token}

  def __getstate__(self):
    state = dict(self.__dict__)
    for key in ("_byte_encoder", "_ranks", "_pattern", "_cache"):
      state.pop(key, None)
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._build()

  @classmethod
  def from_pretrained_folder(cls, path: str) -> CLIPTokenizer:
    """Load a Stable Diffusion / transformers tokenizer folder: vocab.json + merges.txt, or tokenizer.json alone.

    Hub folders carry the classic two files; transformers 5's `save_pretrained` writes only the `tokenizers`
    library's tokenizer.json, whose BPE model holds the same vocabulary and merge table. `path` may be the folder
    holding the files or the pipeline root with a `tokenizer/` subfolder. The pad id is taken from the folder
    because it differs between releases (SD 1.x pads with <|endoftext|>, SD 2.x with "!" = 0) and the text
    encoder was trained with that padding.
    """
    folder = path
    if not _has_tokenizer_files(folder) and os.path.isdir(os.path.join(path, "tokenizer")):
      folder = os.path.join(path, "tokenizer")
    if os.path.isfile(os.path.join(folder, "vocab.json")) or not os.path.isfile(os.path.join(folder, "tokenizer.json")):
      encoder, merge_lines = _read_vocab_and_merges(folder)
    else:
      encoder, merge_lines = _read_tokenizer_json(os.path.join(folder, "tokenizer.json"))
    merges = [tuple(line.split()) for line in merge_lines[:_NUM_MERGES] if line.strip()]

    special = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the later file wins, like transformers
      config_path = os.path.join(folder, name)
      if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
          config = json.load(f)
        for key in ("bos_token", "eos_token", "pad_token"):
          if _token_name(config.get(key)):
            special[key] = _token_name(config[key])
    sot = special.get("bos_token", "<|startoftext|>")
    eot = special.get("eos_token", "<|endoftext|>")
    pad = special.get("pad_token", eot)
    for role, token in (("bos", sot), ("eos", eot), ("pad", pad)):
      if token not in encoder:
        raise ValueError(f"{role} token {token!r} from {folder} is not in its vocabulary")
    tok = cls.__new__(cls)
    tok._setup(encoder, merges, sot, eot, pad_id=encoder[pad], unescape_html=False)
    return tok

  def _clean(self, text: str) -> str:
    if ftfy is not None:
      text = ftfy.fix_text(text)
    if self.unescape_html:
      # Twice, as open_clip does, for captions scraped with doubly escaped entities ("&amp;amp;").
      text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()

  def _bpe(self, word: str) -> str:
    """Space-joined BPE pieces of one pre-token, applying the lowest-ranked merge until none applies."""
    cached = self._cache.get(word)
    if cached is not None:
      return cached
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
      ranked = [(self._ranks.get(pair, float("inf")), i) for i, pair in enumerate(zip(parts, parts[1:]))]
      rank, _ = min(ranked)
      if rank == float("inf"):
        break
      first, second = self.merges[rank]
      merged, i = [], 0
      while i < len(parts):
        if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    result = " ".join(parts)
    self._cache[word] = result
    return result

  def encode(self, text: str) -> list[int]:
    """Token ids of one text without SOT/EOT."""
    ids = []
    for piece in self._pattern.findall(self._clean(text)):
      if piece in (self.sot_token, self.eot_token):
        ids.append(self.encoder[piece])
        continue
      mapped = "".join(self._byte_encoder[b] for b in piece.encode("utf-8"))
      ids.extend(self.encoder[p] for p in self._bpe(mapped).split(" "))
    return ids

  def __call__(self, texts: Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> np.ndarray:
    check_tokenizer_call(texts, context_length)
    out = np.full((len(texts), context_length), self.pad_id, np.int32)
    for row, text in enumerate(texts):
      tokens = [self.sot_id] + self.encode(text)[: context_length - 2] + [self.eot_id]
      out[row, : len(tokens)] = tokens
    return out


register_tokenizer("clip", CLIPTokenizer)

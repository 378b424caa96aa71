"""The CLIP BPE vocabulary ships inside the package: `data.tokenizer='clip'` works on an install without
open-clip-torch or torch (the README's first command), with open_clip's ids."""
import json
import os
import subprocess
import sys
import textwrap

import diffusion_jax
from diffusion_jax import tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # open_clip.tokenize("a photo of a cat"), up to the padding

# Run where importing (or finding) open_clip or torch fails, as on a machine that never installed them.
WITHOUT_TORCH = textwrap.dedent("""
    import importlib.abc, json, sys

    class Uninstalled(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("open_clip", "torch"):
          raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, Uninstalled())
    from diffusion_jax.data.tokenizers import get_tokenizer
    tokens = get_tokenizer("clip")(["a photo of a cat"], 77)
    print(json.dumps({"ids": tokens[0].tolist(), "torch": "torch" in sys.modules}))
""")


def test_vocabulary_is_package_data():
  path = tokenizer.default_bpe_path()
  assert os.path.isfile(path)
  assert os.path.commonpath([path, os.path.dirname(diffusion_jax.__file__)]) == os.path.dirname(diffusion_jax.__file__)
  assert os.path.isfile(os.path.join(os.path.dirname(path), "LICENSE-bpe_simple_vocab_16e6.txt"))


def test_clip_tokenizer_without_open_clip_or_torch():
  out = subprocess.run([sys.executable, "-c", WITHOUT_TORCH], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads(out.stdout.splitlines()[-1])
  assert result["ids"][:7] == CAT_IDS and set(result["ids"][7:]) == {0}
  assert not result["torch"]

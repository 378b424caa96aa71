"""DALL-E 1 on colour emoji named by Unicode: a transformer over an emoji's name (the bundled byte-level BPE trained on
the training names) and an `emoji_vq` run's 8×8 codes, reranked by an `emoji_clip` run.

  python -m diffusion_jax.main --config configs/emoji_clip.py --workdir /tmp/emoji_clip   # reranker and judge
  python -m diffusion_jax.main --config configs/emoji_vq.py --workdir /tmp/emoji_vq       # the image tokenizer
  python -m diffusion_jax.main --config configs/emoji_dalle.py --workdir /tmp/emoji_dalle \\
      --config.dalle.vq_workdir=/tmp/emoji_vq --config.dalle.clip_workdir=/tmp/emoji_clip

The end-of-run evaluation draws one image for each of the 122 held-out names (never seen in training) and ranks each
image's own name among the 122 by the CLIP (`text_retrieval`: R@1/5/10, chance 0.8% / 4.1% / 8.2%), once with a
single draw per name and once keeping the CLIP's best of `sample.candidates` = 8; the real held-out emoji's ranking is
reported beside it, the KID of those images against the held-out emoji in the CLIP's image space (`fid`), and the
test emoji's image-token NLL (`image_nll`). The CLIP that reranks also judges, which
favours the reranked row. Needs the Noto Color Emoji font, as configs/emoji_clip.py. `:tiny` is a seconds-long
variant for tests.
"""
import ml_collections

from diffusion_jax.defaults import evaluator

from . import mnist_dalle


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "tiny"):
    raise ValueError(f"unknown config argument {arg!r}; use '' or 'tiny'")
  c = mnist_dalle.get_config(arg)  # the same transformer, losses and sampling; emoji and their names
  c.data.update(source="emoji", image_size=32, channels=3, random_flip=True, tokenizer="emoji_chat",
                max_text_len=16)
  del c.evals["digits"], c.evals["digits_single"]
  c.evals.retrieval_single = evaluator("text_retrieval", batch_size=128, candidates=1, key="text_retrieval_single")
  c.evals.retrieval = evaluator("text_retrieval", batch_size=128)
  # KID of the (reranked) images drawn for the held-out names against the held-out emoji, in the CLIP's image space
  c.evals.fid = evaluator("fid", batch_size=128, features="clip", source="captions", num_samples=0, frechet=False,
                          precision_recall=True)
  c.sample.prompts = ("grinning face", "red apple", "sun with face", "closed umbrella")
  if arg == "tiny":
    c.evals.retrieval_single.update(max_examples=4)
    c.evals.retrieval.update(max_examples=4)
    c.evals.fid.num_samples = 4
    return c
  c.train.update(steps=900, batch_size=32)  # held-out NLL is lowest near here: 1,283 training emoji overfit
  return c

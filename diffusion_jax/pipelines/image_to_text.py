"""One call that answers questions about images, for a trained run and a transformers LLaVA folder alike.

  pipe = ImageToText.from_pretrained("llava-folder")     # LlavaForConditionalGeneration + tokenizer + processor
  pipe = ImageToText.from_run("/tmp/llava_instruct")      # a run of configs/mnist_llava.py (its EMA/params)
  pipe([image_a, image_b], ["What digit is this?", "Describe it."], max_new_tokens=16, temperature=0.0)

Images are PIL images or uint8/float arrays [H, W, C] (or [H, W]); each is resized, cropped and normalised as the
model expects (the folder's `preprocessor_config.json` or `processor_config.json`, or the run's data settings). Each
prompt becomes a user turn holding the image, rendered by the tokenizer's chat template with transformers'
structured content; its image token then expands to the model's number of image tokens, as transformers'
`LlavaProcessor` does, and the answer is generated with the key/value cache until the end token.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from diffusion_jax.autoregressive.sampler import Sampler, SamplingConfig
from diffusion_jax.data.hf_tokenizer import HFTokenizer
from diffusion_jax.models.llava import LlavaModel
from diffusion_jax.pipelines.image_processor import ImageProcessor, as_pil

class ImageToText:
  """`pipe(images, prompts, *, max_new_tokens, temperature, top_p, top_k, seed, batch_size) -> list[str]`."""

  def __init__(self, model: LlavaModel, tokenizer: HFTokenizer, preprocess: Callable[[Any], np.ndarray], *,
               mesh: Optional[jax.sharding.Mesh] = None):
    self.model, self.tokenizer, self.preprocess, self.mesh = model, tokenizer, preprocess, mesh
    self.sampler = Sampler(model)
    # The placeholder's text is whatever the tokenizer calls the model's image token ('<image>' in llava-hf
    # folders); the chat template writes it once per image and `prompt_ids` expands it.
    self.image_token = tokenizer.tokenizer.id_to_token(model.config.image_token_id)
    if self.image_token is None or tokenizer.tokenizer.token_to_id(self.image_token) != model.config.image_token_id:
      raise ValueError(f"the tokenizer has no token for the model's image token id {model.config.image_token_id}")

  @classmethod
  def from_pretrained(cls, folder: str, **kwargs) -> "ImageToText":
    from diffusion_jax import pretrained
    model = pretrained.load(folder, **kwargs)
    if not isinstance(model, LlavaModel):
      raise ValueError(f"{folder} holds a {type(model).__name__}, not a LLaVA model")
    return cls(model, HFTokenizer.from_folder(folder), ImageProcessor.from_folder(folder))

  @classmethod
  def from_run(cls, workdir: str) -> "ImageToText":
    """A finished run of the llava task, with the config its newest checkpoint saved (EMA weights where the run
    evaluates with them), on this process's devices."""
    from diffusion_jax.train import runs
    from diffusion_jax.train.trainer import Trainer
    config = runs.RunSource("workdir", workdir, task="llava").config()
    trainer = Trainer(config, workdir)
    ctx = trainer.model_context(trainer.load_for_inference())
    task, d = trainer.task, config.data

    def preprocess(image):
      pixels = np.asarray(as_pil(image, d.channels).resize((d.image_size, d.image_size), Image.Resampling.BICUBIC),
                          np.float32)
      pixels = pixels[..., None] if pixels.ndim == 2 else pixels
      return np.asarray(task.pixels(pixels / np.float32(127.5) - np.float32(1.0)))

    return cls(ctx.merge(), task.tokenizer, preprocess, mesh=ctx.mesh)

  def prompt_ids(self, prompt: str) -> list[int]:
    """A user turn with the image and `prompt`, through the chat template, with the image token expanded.

    The message has the structured content transformers' processors pass ({'type': 'image'} then the text), which
    is what LLaVA folders' chat templates iterate over; the template writes the start token itself, so the text
    is encoded without adding special tokens, as `processor.apply_chat_template(..., tokenize=True)` does."""
    message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
    text = self.tokenizer.apply_chat_template([message], add_generation_prompt=True)
    if self.image_token not in text:
      raise ValueError(f"the chat template wrote no {self.image_token} for the image")
    text = text.replace(self.image_token, self.image_token * self.model.config.num_image_tokens, 1)
    return self.tokenizer.encode([text], add_special_tokens=False)[0]

  def __call__(self, images: Sequence[Any], prompts: Sequence[str] | str, *, max_new_tokens: int = 32,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
               batch_size: int = 16) -> list[str]:
    images = list(images)
    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(images):
      raise ValueError(f"got {len(images)} images and {len(prompts)} prompts; give one prompt or one per image")
    if not images:
      return []
    pixels = np.stack([self.preprocess(im) for im in images])
    ids = [self.prompt_ids(p) for p in prompts]
    stops = tuple(t for t in (self.tokenizer.eos_id,) if t is not None)
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            stop_tokens=stops, pad_id=self.tokenizer.pad_id)
    tokens = generate_answers(self.sampler, ids, pixels, config, batch_size=batch_size, seed=seed, mesh=self.mesh)
    return [self.tokenizer.decode([t for t in row if t not in stops]).strip() for row in tokens]


def generate_answers(sampler: Sampler, prompts: Sequence[Sequence[int]], pixels: np.ndarray, config: SamplingConfig,
                     *, batch_size: int, seed: int = 0, mesh: Optional[jax.sharding.Mesh] = None) -> list[list[int]]:
  """The generated ids (without padding) of each prompt with its image, in chunks of `batch_size` rows padded to
  one shape, so a whole evaluation compiles the sampler once."""
  length = max(len(p) for p in prompts)
  ids = np.full((len(prompts), length), config.pad_id, np.int32)
  for i, p in enumerate(prompts):
    ids[i, :len(p)] = p
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  batch_size = min(batch_size, len(prompts))
  out: list[list[int]] = []
  for start in range(0, len(ids), batch_size):
    rows = slice(start, start + batch_size)
    n = len(ids[rows])

    def fill(a):  # the last chunk repeats its last row up to the batch size
      return np.concatenate([a, np.repeat(a[-1:], batch_size - n, axis=0)]) if n < batch_size else a

    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
      got = sampler(fill(ids[rows]), fill(lengths[rows]), config=config, rng=jax.random.key(seed + start),
                    prefill={"pixels": jnp.asarray(fill(pixels[rows]))})
    tokens, counts = np.asarray(got.tokens)[:n], np.asarray(got.lengths)[:n]
    out += [row[:c].tolist() for row, c in zip(tokens, counts)]
  return out


__all__ = ["ImageProcessor", "ImageToText", "generate_answers"]

"""unCLIP's decoder (DALL-E 2, section 2) and the whole text → image chain, on the trainer.

The decoder is a pixel diffusion U-Net conditioned on a CLIP image embedding — projected into extra context tokens in
front of the caption's token states and added to the time embedding (`models.unclip.UnCLIPTextProjModel`, GLIDE's
recipe as Karlo builds it) — and on the caption. The towers are the frozen ones of a finished contrastive run
(`text.clip_workdir`, conditioners 'clip_text' and 'clip_image'); in training the image embedding is the image tower's
embedding of the training image, dropped for `diffusion.image_drop_prob` of the rows and the caption for
`diffusion.cond_drop_prob`, so that guidance works in both directions.

Sampling runs the chain in one compiled program per batch size: caption → CLIP text tower → image embedding → decoder.
Where the image embedding comes from is `unclip.image_embedding`:
  'prior'  the prior of a finished `unclip_prior` (diffusion) or `unclip_ar_prior` (autoregressive) run
           (`unclip.prior_workdir`, trained on the same CLIP run), restored frozen into this model;
           `unclip.candidates` draws per caption, the one closest to the caption kept;
  'text'   the caption's CLIP text embedding itself (the design documents' ablation (b));
  'zero'   a zero embedding: the caption alone (ablation (a)).
`sample.variations_of` (image files) decodes each image's own CLIP embedding `sample.per_prompt` times (DALL-E 2's
variations), `sample.variations_heldout=N` the same for the first N held-out images (each row: the source, then its
variations); `sample.interpolate` (two image files) writes a strip decoded along the slerp between their embeddings;
`sample.text_diff` (an image file, its caption, a new caption) a strip of DALL-E 2's text diffs: the image embedding
turned towards the normalised difference of the two captions' text embeddings, by up to `sample.text_diff_max` of
the way. `clip_score` (the `digit_accuracy` evaluator's `clip_score=True`) is 100 × the cosine between the frozen image
tower's embedding of a generated image and the text tower's of its prompt.

`unclip.upsampler_workdirs` (finished `upsampler` runs, `tasks.upsampler`) is the cascade after the decoder: their
denoisers are restored frozen into this model and every decoded image is upsampled by each in turn, in the same
compiled program; each must take the size the stage before it makes.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from diffusion_jax.config import ConfigError
from diffusion_jax.contrastive import zero_shot
from diffusion_jax.eval import image_io
from diffusion_jax.models.conditioners import downsample, upsample_bicubic
from diffusion_jax.models.denoiser import DiffusionModel
from diffusion_jax.parallel import host
from diffusion_jax.tasks.diffusion import DiffusionTask
from diffusion_jax.tasks.upsampler import Cascade
from diffusion_jax.train import parts, runs
from diffusion_jax.train.task import ModelContext, register

IMAGE_EMBEDDINGS = ("prior", "text", "zero")
# Tasks whose runs can be a decoder's prior: each offers prior_module, prior_select, load_stats and
# chain_embeddings (see tasks.unclip_prior.CLIPPriorTask).
PRIOR_TASKS = ("unclip_prior", "unclip_ar_prior")


def text_diff(image_emb: np.ndarray, from_text: np.ndarray, to_text: np.ndarray,
              weights: Sequence[float]) -> np.ndarray:
  """DALL-E 2's text diffs (section 3.3): the image embedding's direction slerped towards the unit difference of the
  two text embeddings by each weight, at the image embedding's own norm (the decoder was trained on unnormalised
  embeddings)."""
  diff = to_text - from_text
  diff = diff / np.linalg.norm(diff) * np.linalg.norm(image_emb)
  return slerp(image_emb, diff, weights)


def slerp(a: np.ndarray, b: np.ndarray, weights: Sequence[float]) -> np.ndarray:
  """Spherical interpolation between two vectors (their norms interpolated linearly), one row per weight."""
  na, nb = np.linalg.norm(a), np.linalg.norm(b)
  ua, ub = a / na, b / nb
  omega = np.arccos(np.clip(np.dot(ua, ub), -1.0, 1.0))
  rows = []
  for w in weights:
    if omega < 1e-6:
      u = (1 - w) * ua + w * ub
    else:
      u = (np.sin((1 - w) * omega) * ua + np.sin(w * omega) * ub) / np.sin(omega)
    rows.append(u / np.linalg.norm(u) * ((1 - w) * na + w * nb))
  return np.stack(rows).astype(np.float32)


@register("unclip_decoder")
class UnCLIPDecoderTask(DiffusionTask):

  def __init__(self, config):
    super().__init__(config)
    u = config.unclip
    if set(self.conditioner_names) != {"clip_text", "clip_image"} or self.latents is not None:
      raise ConfigError("task='unclip_decoder' takes model.conditioners=('clip_text', 'clip_image') on pixels (no "
                        "latent.* VAE)")
    if u.image_embedding not in IMAGE_EMBEDDINGS:
      raise ConfigError(f"unclip.image_embedding must be one of {IMAGE_EMBEDDINGS}, got {u.image_embedding!r}")
    self.prior_source = self.prior_task = None  # training needs no prior; text → image sampling does
    if u.prior_workdir:
      run = runs.RunSource("unclip.prior_workdir", u.prior_workdir, task=PRIOR_TASKS, check=self._same_clip)
      self.prior_task = run.task()
      # Sampling alone uses the prior: another prior (or none) may be given at any later start.
      self.prior_source = runs.RunSource("unclip.prior_workdir", u.prior_workdir, task=PRIOR_TASKS, frozen=True,
                                         select=self.prior_task.prior_select(), recorded=False)
    self.cascade = Cascade("unclip.upsampler_workdirs", tuple(u.upsampler_workdirs), size=int(config.data.image_size),
                           channels=int(config.data.channels))

  def _same_clip(self, prior_config) -> None:
    mine = os.path.realpath(self.config.text.clip_workdir)
    theirs = os.path.realpath(prior_config.text.clip_workdir)
    if mine != theirs:
      raise ConfigError(f"unclip.prior_workdir was trained on the CLIP run {theirs}, this decoder on {mine}: the "
                        "image embeddings must come from the same CLIP")

  def check_run(self) -> None:
    super().check_run()
    cfg = self.config
    samples_chain = (cfg.train.sample_at_end or cfg.train.sample_every) and not self._samples_images()
    judges_chain = any(e.type == "digit_accuracy" and int(e.every) >= 0 for e in cfg.evals.values())
    if samples_chain or judges_chain:
      self.image_embedding  # a chain without its prior fails now, not after training  # noqa: B018

  def _samples_images(self) -> bool:
    """Whether `--mode sample` decodes embeddings of images (variations, strips) rather than captions."""
    s = self.config.sample
    return bool(s.variations_of or s.interpolate or s.text_diff or int(s.variations_heldout))

  @property
  def image_embedding(self) -> str:
    mode = self.config.unclip.image_embedding
    if mode == "prior" and self.prior_task is None:
      raise ConfigError("unclip.image_embedding='prior' samples from a prior: set unclip.prior_workdir to a finished "
                        "unclip_prior or unclip_ar_prior run (or choose 'text' or 'zero')")
    return mode

  # ------------------------------------------------------------------ the model
  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    model = super().build_model(rngs)
    prior = self.prior_task.prior_module(rngs) if self.prior_task is not None else None
    return DiffusionModel(model.denoiser, model.conditioners, model.vae, prior=prior,
                          upsamplers=self.cascade.build(rngs), guide=model.guide)

  def frozen(self):
    return nnx.Any(super().frozen(), parts.under("prior", "upsamplers"))

  def weight_sources(self):
    return (list(super().weight_sources()) + ([self.prior_source] if self.prior_source is not None else [])
            + self.cascade.sources)

  def prepare(self, ctx: ModelContext, *, training: bool) -> None:
    super().prepare(ctx, training=training)
    if self.prior_task is not None:
      self.prior_task.load_stats(self.config.unclip.prior_workdir)

  # ------------------------------------------------------------------ sampling
  def _embeddings(self, model, inputs: dict, rng: jax.Array) -> jax.Array:
    """The image embedding each caption is decoded from (see the module docstring)."""
    tower = model.conditioners["clip_text"].tower
    tokens = inputs["tokens"]
    mode = self.image_embedding
    if mode == "zero":
      return jnp.zeros((tokens.shape[0], tower.text_projection.out_features), jnp.float32)
    if mode == "text":
      return tower(tokens)[1].astype(jnp.float32)
    return self.prior_task.chain_embeddings(model.prior, tower, tokens, rng, self.config.unclip)

  def _generate_fn(self, num_images: int, guidance_scale: float):
    decode = super()._generate_fn(num_images, guidance_scale)

    def generate(model, inputs, uninputs, rng):
      rng_prior, rng_decode = jax.random.split(rng)
      inputs = dict(inputs)
      given = inputs.pop("given_embedding", None)
      emb = given if given is not None else self._embeddings(model, inputs, rng_prior)
      inputs.update(image_embedding=emb, image_dropped=jnp.zeros(emb.shape[:1], bool))
      uninputs = dict(uninputs, image_embedding=jnp.zeros((1, emb.shape[-1]), jnp.float32),
                      image_dropped=jnp.ones((1,), bool))
      return self.cascade(model.upsamplers, decode(model, inputs, uninputs, rng_decode), jax.random.fold_in(rng, 1))

    return generate

  def generate_from_embeddings(self, ctx: ModelContext, embeddings: np.ndarray, seed: int,
                               prompts: Sequence[str] | None = None) -> np.ndarray:
    """Images in [-1, 1] decoded from given CLIP image embeddings (with `prompts`, default the empty caption)."""
    s = self.config.sample
    n = len(embeddings)
    prompts = list(prompts) if prompts is not None else [""] * n
    chunk = min(int(s.batch_size), n)
    fn = ctx.jit(self._generate_fn(chunk, float(s.guidance_scale)),
                 key=(self, "generate_given", chunk, float(s.guidance_scale)))
    inputs = dict(self.prompt_inputs(prompts), given_embedding=np.asarray(embeddings, np.float32))
    uninputs = self.prompt_inputs([s.negative_prompt])
    return host.run_chunked(lambda x, rng: fn(x, uninputs, rng), inputs, chunk,
                            extra=lambda i: (jax.random.fold_in(jax.random.key(seed), i),))

  def image_embeddings(self, ctx: ModelContext, images: np.ndarray) -> np.ndarray:
    """CLIP image embeddings [N, D] of pipeline images [N, H, W, C] in [-1, 1]."""
    fn = ctx.jit(lambda m, x: m.conditioners["clip_image"]({"image": x})["image_embedding"],
                 key=(self, "embed_images"))
    return host.run_chunked(fn, np.asarray(images, np.float32), min(256, len(images)))

  def read_images(self, paths: Sequence[str]) -> np.ndarray:
    """Image files as pipeline images: resized to data.image_size, data.channels, in [-1, 1]."""
    d = self.config.data
    out = []
    for path in paths:
      if not os.path.isfile(path):
        raise ConfigError(f"no image file {path!r}")
      try:
        image = Image.open(path)
        image = image.convert("L" if d.channels == 1 else "RGB").resize((d.image_size, d.image_size),
                                                                          Image.BICUBIC)
      except OSError as e:
        raise ConfigError(f"cannot read {path!r} as an image: {e}") from None
      pixels = np.asarray(image, np.float32).reshape(d.image_size, d.image_size, d.channels)
      out.append(pixels / 127.5 - 1.0)
    return np.stack(out)

  def sample(self, ctx: ModelContext, out_dir: str) -> dict[str, Any]:
    s = self.config.sample
    if s.variations_of:
      return self._variations(ctx, out_dir, list(s.variations_of))
    if s.interpolate:
      return self._interpolation(ctx, out_dir, list(s.interpolate))
    if s.text_diff:
      return self._text_diff(ctx, out_dir, list(s.text_diff))
    if int(s.variations_heldout):
      return self._heldout_variations(ctx, out_dir, int(s.variations_heldout))
    return super().sample(ctx, out_dir)

  def text_embeddings(self, ctx: ModelContext, prompts: Sequence[str]) -> np.ndarray:
    """CLIP text embeddings [N, D] of `prompts` by the frozen text tower."""
    fn = ctx.jit(lambda m, t: m.conditioners["clip_text"].tower(t)[1].astype(jnp.float32), key=(self, "embed_text"))
    tokens = self.prompt_inputs(list(prompts))["tokens"]
    return host.run_chunked(fn, tokens, min(256, len(tokens)))

  def clip_score(self, ctx: ModelContext, images: np.ndarray, prompts: Sequence[str]) -> float:
    """Mean 100 × cosine of the generated images' and their prompts' CLIP embeddings (CLIPScore without the clip
    at 0), by the frozen towers the decoder was conditioned with."""
    image = zero_shot.normalize(self.image_embeddings(ctx, images))
    text = zero_shot.normalize(self.text_embeddings(ctx, prompts))
    return float(100.0 * np.mean(np.sum(image * text, axis=-1)))

  def variation_scores(self, ctx: ModelContext, images: np.ndarray, per_image: int, seed: int) -> dict[str, float]:
    """DALL-E 2's variations judged by the decoder's own CLIP: `per_image` variations of each of `images` [N, H, W, C]
    (in [-1, 1], N >= 2) decoded from its image embedding with the empty caption through the whole cascade (and
    downsampled back to the tower's size), against random pairs of distinct `images` as the baseline."""
    if len(images) < 2:
      raise ConfigError(f"variations need at least 2 held-out images to pair, got {len(images)}")
    source, decoded = self._decode_variations(ctx, images, per_image, seed, at_source_size=True)
    source = zero_shot.normalize(source)
    cos = zero_shot.normalize(self.image_embeddings(ctx, decoded)) @ source.T  # [N * per_image, N]
    owner = np.repeat(np.arange(len(images)), per_image)
    own = cos[np.arange(len(cos)), owner]
    others = (cos.sum(axis=1) - own) / (len(images) - 1)
    pairs = source @ source.T
    off_diagonal = ~np.eye(len(images), dtype=bool)
    return {"variation_similarity": float(own.mean()),  # a variation and its own source
            "variation_to_others": float(others.mean()),  # a variation and the other sources
            "random_pair_similarity": float(pairs[off_diagonal].mean()),  # two distinct real images: the baseline
            "variation_source_top1": float(np.mean(cos.argmax(axis=1) == owner)),  # chance: 1 / N
            "examples": float(len(images))}

  def heldout_outputs(self, ctx: ModelContext, images: np.ndarray, seed: int) -> np.ndarray:
    """One variation of each of images [N, H, W, C] in [-1, 1], through the whole cascade and downsampled back to
    their size (what `fid` with source='heldout' compares with them)."""
    return self._decode_variations(ctx, images, 1, seed, at_source_size=True)[1]

  def _decode_variations(self, ctx: ModelContext, images: np.ndarray, per: int, seed: int,
                         at_source_size: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(CLIP image embeddings [N, D] of `images`, `per` variations of each decoded from them with the empty
    caption [N * per, H', W', C], image-major; at the images' size H with `at_source_size`)."""
    embeddings = np.asarray(self.image_embeddings(ctx, images))
    decoded = self.generate_from_embeddings(ctx, np.repeat(embeddings, per, axis=0), seed)
    if at_source_size and decoded.shape[1] != images.shape[1]:
      decoded = np.asarray(downsample(jnp.asarray(decoded), images.shape[1]))
    return embeddings, decoded

  def _variations(self, ctx, out_dir, paths):
    s = self.config.sample
    per = int(s.per_prompt)
    _, images = self._decode_variations(ctx, self.read_images(paths), per, int(s.seed))
    if not ctx.is_main_process:
      return {}
    extra = [{"variation_of": paths[i // per]} for i in range(len(images))]
    return image_io.save_samples(out_dir, images, [""] * len(images), grid_cols=per, extra=extra)

  def _heldout_variations(self, ctx, out_dir, count):
    """Rows of a held-out image of the eval split (resized to the cascade's output) and its variations."""
    s = self.config.sample
    per = int(s.per_prompt)
    sources = self.heldout_images(ctx, count)
    _, images = self._decode_variations(ctx, sources, per, int(s.seed))
    if not ctx.is_main_process:
      return {}
    shown = np.asarray(upsample_bicubic(jnp.asarray(sources), images.shape[1]))
    rows = np.concatenate([shown[:, None], images.reshape(len(sources), per, *images.shape[1:])], axis=1)
    extra = [{"example": i, "kind": "source" if j == 0 else "variation"}
             for i in range(len(sources)) for j in range(per + 1)]
    return image_io.save_samples(out_dir, rows.reshape(-1, *images.shape[1:]), [""] * len(extra),
                                 grid_cols=per + 1, extra=extra)

  def _interpolation(self, ctx, out_dir, paths):
    if len(paths) != 2:
      raise ConfigError(f"sample.interpolate takes two image files, got {len(paths)}")
    s = self.config.sample
    emb = self.image_embeddings(ctx, self.read_images(paths))
    weights = np.linspace(0.0, 1.0, max(int(s.per_prompt), 2))
    images = self.generate_from_embeddings(ctx, slerp(emb[0], emb[1], weights), int(s.seed))
    if not ctx.is_main_process:
      return {}
    extra = [{"weight": float(w), "between": paths} for w in weights]
    return image_io.save_samples(out_dir, images, [""] * len(weights), grid_cols=len(weights), extra=extra)

  def _text_diff(self, ctx, out_dir, spec):
    if len(spec) != 3:
      raise ConfigError("sample.text_diff takes (image file, its caption, the new caption), got "
                        f"{len(spec)} entries")
    path, before, after = spec
    s = self.config.sample
    emb = self.image_embeddings(ctx, self.read_images([path]))[0]
    texts = self.text_embeddings(ctx, [before, after])
    weights = np.linspace(0.0, float(s.text_diff_max), max(int(s.per_prompt), 2))
    # Decoded with the empty caption, as variations are: the strip shows what the embedding alone carries.
    images = self.generate_from_embeddings(ctx, text_diff(emb, texts[0], texts[1], weights), int(s.seed))
    if not ctx.is_main_process:
      return {}
    extra = [{"weight": float(w), "image": path, "from": before, "to": after} for w in weights]
    return image_io.save_samples(out_dir, images, [""] * len(weights), grid_cols=len(weights), extra=extra)

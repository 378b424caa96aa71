"""Diffusion upsamplers (the super-resolution stages of DALL-E 2 and Imagen) on the trainer, and cascades of them.

An upsampler is a pixel U-Net diffusion model whose one condition is the low-resolution image: the 'low_res'
conditioner (`models.conditioners.LowResConditioner`) resizes it bilinearly to the output size and concatenates it
to x_t, so the U-Net takes twice the image's channels. In training that image is the batch's own image downsampled
(area) to `upsample.low_res_size` and corrupted by `upsample.augment` — Gaussian blur ('blur', DALL-E 2's first
upsampler), noise to a random level given to the model ('noise', Imagen) or nothing ('none') — so that it learns
not to trust details an earlier stage's samples lack. Nothing is dropped and nothing is guided: Karlo's
super-resolution U-Nets are unconditional apart from the image too.

  task.upsample(ctx, low_res [N, h, w, C], seed) -> [N, H, W, C]   in [-1, 1], one program per chunk size
  --mode sample       held-out images of the eval split as bicubic | upsampled | original triplets
  evals 'upsampler'   PSNR and SSIM of the upsampling next to bicubic's (`evaluators.upsampler`)

`Cascade` restores finished upsampler runs frozen into another task's model and applies them in order, inside that
task's compiled sampler (unCLIP's decoder: `unclip.upsampler_workdirs`).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.config import ConfigError
from diffusion_jax.diffusion import samplers
from diffusion_jax.eval import image_io, image_metrics
from diffusion_jax.models.conditioners import downsample, upsample_bicubic
from diffusion_jax.parallel import host
from diffusion_jax.tasks.diffusion import DiffusionTask
from diffusion_jax.train import runs
from diffusion_jax.train.task import ModelContext, register

GRID_TRIPLETS_PER_ROW = 4
_downsample = jax.jit(downsample, static_argnums=1)


@register("upsampler")
class UpsamplerTask(DiffusionTask):
  upsamples = True

  fid_source = "heldout"  # an upsampler draws nothing without a low-res image: `fid` compares its upsamplings

  def __init__(self, config):
    super().__init__(config)
    u, d = config.upsample, config.data
    if self.conditioner_names != ("low_res",) or self.denoiser != "unet" or self.latents is not None:
      raise ConfigError("task='upsampler' takes model.conditioners=('low_res',) and model.denoiser='unet' on pixels "
                        "(no latent.* VAE)")
    if not 0 < int(u.low_res_size) < int(d.image_size):
      raise ConfigError(f"upsample.low_res_size={u.low_res_size} must be above 0 and below data.image_size="
                        f"{d.image_size}")
    if float(config.diffusion.cond_drop_prob):
      raise ConfigError(f"diffusion.cond_drop_prob={config.diffusion.cond_drop_prob}: an upsampler is not guided and "
                        "its image is never dropped; set it to 0")
    lo, hi = (float(s) for s in u.blur_sigma)
    if not 0.0 <= lo <= hi:
      raise ConfigError(f"upsample.blur_sigma={tuple(u.blur_sigma)} must be a range (lo, hi) with 0 <= lo <= hi")
    if not 0 <= int(u.sample_noise_level) <= int(u.noise_level_max) <= int(config.diffusion.num_timesteps):
      raise ConfigError(f"upsample: 0 <= sample_noise_level ({u.sample_noise_level}) <= noise_level_max "
                        f"({u.noise_level_max}) <= diffusion.num_timesteps ({config.diffusion.num_timesteps})")
    self.low_res_conditioner()  # refuses an unknown upsample.augment

  @property
  def low_res_size(self) -> int:
    return int(self.config.upsample.low_res_size)

  @property
  def image_size(self) -> int:
    return int(self.config.data.image_size)

  @property
  def channels(self) -> int:
    return int(self.config.data.channels)

  # ------------------------------------------------------------------ sampling
  def upsample_images(self, model, low_res: jax.Array, rng: jax.Array) -> jax.Array:
    """Upsampled images [N, H, W, C] of `low_res` [N, h, w, C], both in [-1, 1]. Traceable: a cascade calls it inside
    another task's program with `model` the upsampler's DiffusionModel restored there."""
    rng_aug, rng_noise, rng_sample = jax.random.split(rng, 3)
    n = low_res.shape[0]
    batch = {"low_res": low_res, **model.conditioners["low_res"].draw(rng_aug, n, training=False)}
    cond = model.condition(batch)
    x = samplers.sample(lambda x_t, t: model(x_t, t, cond), self.schedule,
                        jax.random.normal(rng_noise, (n, *self.shape), jnp.float32), rng_sample,
                        **self.sampling_options())
    return jnp.clip(x, -1.0, 1.0)

  def upsample(self, ctx: ModelContext, low_res_images: np.ndarray, seed: int) -> np.ndarray:
    """`low_res_images` [N, h, w, C] in [-1, 1] upsampled to [N, H, W, C], in chunks of `sample.batch_size`."""
    low = np.asarray(low_res_images, np.float32)
    want = (self.low_res_size, self.low_res_size, self.channels)
    if low.ndim != 4 or low.shape[1:] != want or not len(low):
      raise ValueError(f"upsample takes images [N, {', '.join(map(str, want))}], got shape {low.shape}")
    chunk = min(int(self.config.sample.batch_size), len(low))
    fn = ctx.jit(self.upsample_images, key=(self, "upsample"))
    return host.run_chunked(fn, low, chunk, extra=lambda i: (jax.random.fold_in(jax.random.key(seed), i),))

  # ------------------------------------------------------------------ measuring
  def scores(self, images: jax.Array, upsampled: jax.Array) -> dict[str, jax.Array]:
    """Per-image PSNR and SSIM against `images` [N, H, W, C] of `upsampled`, and of bicubic upsampling of the same
    downsample the upsampler was given."""
    truth = image_metrics.signed_to_unit(images)
    bicubic = upsample_bicubic(downsample(images, self.low_res_size), self.image_size)
    out = {}
    for name, x in (("upsampler", upsampled), ("bicubic", bicubic)):
      x = image_metrics.signed_to_unit(x)
      out[f"{name}_psnr"] = image_metrics.psnr(x, truth)
      out[f"{name}_ssim"] = image_metrics.ssim(x, truth)
    return out

  def heldout_outputs(self, ctx: ModelContext, images: np.ndarray, seed: int) -> np.ndarray:
    """The upsampling of images [N, H, W, C] in [-1, 1] downsampled to the input size (every process all of them).
    The sampler is `upsample`'s program, so an evaluation and `--mode sample` of one chunk size compile it once."""
    low = np.asarray(_downsample(jnp.asarray(np.asarray(images, np.float32)), self.low_res_size))
    return self.upsample(ctx, low, seed)

  def measure_images(self, ctx: ModelContext, images: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """`scores` of `heldout_outputs` of images [N, H, W, C] in [-1, 1]."""
    images = np.asarray(images, np.float32)
    return jax.tree.map(np.asarray, self._scores(ctx)(images, self.heldout_outputs(ctx, images, seed)))

  def _scores(self, ctx: ModelContext):
    return ctx.jit(lambda _, images, upsampled: self.scores(images, upsampled), key=(self, "scores"))

  def photos(self, names: Sequence[str], crops: int) -> np.ndarray:
    """Crops of scikit-image's photos (no training set holds them) at the data's size and channels."""
    return image_metrics.reference_photos(tuple(names), self.image_size, self.channels, crops)

  def sample(self, ctx: ModelContext, out_dir: str) -> dict[str, Any]:
    """Held-out images of the eval split, each as bicubic | upsampled | original, with each tile's PSNR."""
    s, u = self.config.sample, self.config.upsample
    truth = self.heldout_images(ctx, int(u.sample_images))
    low = np.asarray(_downsample(jnp.asarray(truth), self.low_res_size))
    upsampled = self.upsample(ctx, low, int(s.seed))
    psnr = {k: np.asarray(v) for k, v in self._scores(ctx)(truth, upsampled).items() if k.endswith("_psnr")}
    if not ctx.is_main_process:
      return {}
    tiles = {"bicubic": (np.asarray(upsample_bicubic(jnp.asarray(low), self.image_size)), psnr["bicubic_psnr"]),
             "upsampled": (upsampled, psnr["upsampler_psnr"]), "original": (truth, None)}
    images, prompts, extra = [], [], []
    for i in range(len(truth)):
      for kind, (tile, score) in tiles.items():
        images.append(tile[i])
        prompts.append(kind)
        extra.append({"example": i} | ({"psnr": float(score[i])} if score is not None else {}))
    cols = len(tiles) * min(GRID_TRIPLETS_PER_ROW, len(truth))
    return image_io.save_samples(out_dir, np.stack(images), prompts, grid_cols=cols, extra=extra)


class Cascade:
  """Finished upsampler runs applied in order to another stage's images (unCLIP's decoder → 64 → 256 px).

  Their denoisers are restored frozen (EMA where the run evaluates with it) under `target.<i>` of the host task's
  model, whose `build` modules they fill; `__call__` runs every stage inside the host's traced sampler. Each stage must
  take the size (and channels) the stage before it makes: a one-line ConfigError otherwise.
  """

  def __init__(self, what: str, workdirs: Sequence[str], *, size: int, channels: int, target: str = "upsamplers"):
    self.sources, self.tasks = [], []
    for i, workdir in enumerate(workdirs):
      name = f"{what}[{i}]"
      # Only sampling runs the cascade: stages may be added or swapped at any later start.
      source = runs.RunSource(name, workdir, task="upsampler", select=("denoiser",), target=f"{target}.{i}",
                              frozen=True, recorded=False)
      task = source.task()
      if (task.low_res_size, task.channels) != (size, channels):
        before = "the model it follows" if i == 0 else f"{what}[{i - 1}]"
        raise ConfigError(f"{name}={workdir!r} upsamples {task.low_res_size}px images of {task.channels} channels, "
                          f"but {before} makes {size}px images of {channels}")
      self.sources.append(source)
      self.tasks.append(task)
      size = task.image_size
    self.size = size  # what the last stage makes

  def __len__(self) -> int:
    return len(self.tasks)

  def build(self, rngs: nnx.Rngs) -> list[nnx.Module]:
    """Each stage's model (its DiffusionModel), to be filled from `sources`."""
    return [task.build_model(rngs) for task in self.tasks]

  def __call__(self, models: Sequence[nnx.Module] | None, images: jax.Array, rng: jax.Array) -> jax.Array:
    for i, task in enumerate(self.tasks):
      images = task.upsample_images(models[i], images, jax.random.fold_in(rng, i))
    return images

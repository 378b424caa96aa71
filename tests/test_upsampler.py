"""Diffusion upsamplers: the 'low_res' conditioner's image and corruption, a tiny run with its `upsampler` evaluator
and samples, and the cascade after unCLIP's decoder (restored frozen, run in the decoder's program, sizes checked)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.mnist_unclip import get_config as unclip_config
from configs.mnist_upsampler import get_config
from diffusion_jax.config import ConfigError, one_line
from diffusion_jax.models import conditioners as cond_lib
from diffusion_jax.pretrained import weights
from diffusion_jax.train import parts
from diffusion_jax.train.task import get_task
from diffusion_jax.train.trainer import Trainer
from tests.runs import unclip_clip_run


def _images(n=4, size=16, channels=1, seed=0):
  return jax.random.uniform(jax.random.key(seed), (n, size, size, channels), minval=-1.0, maxval=1.0)


# ---------------------------------------------------------------------------------------------------- conditioner
def test_downsample_is_the_block_mean_and_none_conditions_on_it_unchanged():
  x = _images(2, 16, 3)
  low = cond_lib.downsample(x, 8)
  np.testing.assert_allclose(low[0, 0, 0], x[0, :2, :2].mean(axis=(0, 1)), rtol=1e-6)
  assert cond_lib.downsample(x, 12).shape == (2, 12, 12, 3)  # not a divisor: antialiased resize
  c = cond_lib.LowResConditioner(8, 3, "none")
  batch = {"image": x, **c.draw(jax.random.key(0), 2, training=True)}
  out = c(batch)
  assert set(out) == {"low_res"}
  np.testing.assert_array_equal(out["low_res"], low)
  # Sampling conditions on the given image as it is.
  np.testing.assert_array_equal(c({"low_res": low})["low_res"], low)
  with pytest.raises(ValueError, match="takes 8x8x3 images, got 4x4x3"):
    c({"low_res": low[:, :4, :4]})


def test_blur_draws_a_sigma_per_row_in_training_only():
  x = _images(64, 16)
  c = cond_lib.LowResConditioner(8, 1, "blur", blur_sigma=(0.4, 0.6))
  draws = c.draw(jax.random.key(1), 64, training=True)
  sigma = np.asarray(draws["low_res_sigma"])
  assert sigma.shape == (64,) and np.all((sigma >= 0.4) & (sigma <= 0.6)) and sigma.std() > 0.03
  plain = cond_lib.downsample(x, 8)
  blurred = np.asarray(c(dict(image=x, **draws))["low_res"])
  assert blurred.shape == (64, 8, 8, 1)
  assert np.abs(blurred - plain).mean() > 0.05  # the blur changes the image …
  np.testing.assert_allclose(blurred.mean(axis=(1, 2, 3)), plain.mean(axis=(1, 2, 3)), atol=0.05)  # … not its level
  assert np.asarray(plain).std() > blurred.std()
  # σ = 0 leaves a row unchanged; sampling draws no blur.
  np.testing.assert_allclose(cond_lib.gaussian_blur(plain, jnp.zeros(64), 2), plain, atol=1e-6)
  assert c.draw(jax.random.key(1), 64, training=False) == {}


def test_noise_augmentation_gives_its_level_as_the_class_label():
  signal = (1.0, 0.9, 0.5)  # levels 0 (clean), 1, 2
  c = cond_lib.LowResConditioner(8, 1, "noise", noise_signal=signal, sample_noise_level=1)
  assert c.noise_levels == 3
  x = _images(256, 16)
  draws = c.draw(jax.random.key(2), 256, training=True)
  out = c(dict(image=x, **draws))
  level = np.asarray(out["class_labels"])
  assert set(level.tolist()) == {0, 1, 2}
  plain = np.asarray(cond_lib.downsample(x, 8))
  err = np.abs(np.asarray(out["low_res"]) - plain).mean(axis=(1, 2, 3))
  assert np.all(err[level == 0] < 1e-6) and err[level == 2].mean() > err[level == 1].mean() > 0.1
  fixed = c.draw(jax.random.key(2), 4, training=False)
  assert np.asarray(fixed["low_res_level"]).tolist() == [1] * 4
  # Without draws (the bicubic comparison's input) the image is clean and labelled level 0.
  assert np.asarray(c({"image": x[:2]})["class_labels"]).tolist() == [0, 0]


def test_config_mistakes_are_one_line():
  c = get_config("tiny")
  c.task = "diffusion"
  with pytest.raises(ConfigError, match="'low_res' makes an upsampler, task='upsampler'"):
    get_task(c)
  c = get_config("tiny")
  c.diffusion.cond_drop_prob = 0.1
  with pytest.raises(ConfigError, match="an upsampler is not guided"):
    get_task(c)
  c = get_config("tiny")
  c.upsample.augment = "jpeg"
  with pytest.raises(ConfigError, match="upsample.augment: low-res augmentation must be one of"):
    get_task(c)
  c = get_config("tiny")
  c.upsample.augment = "noise"
  task = get_task(c)  # the noise level is the U-Net's class label: one embedding per level
  assert task.denoiser_config().num_class_embeds == c.upsample.noise_level_max + 1
  assert task.denoiser_config().in_channels == 2


# ---------------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A tiny upsampler of 28 → 56 px (the size a tiny unCLIP decoder makes) and a tiny CLIP run (its saved
  initialisation) for the decoder."""
  base = tmp_path_factory.mktemp("upsampler")
  root = {name: str(base / name) for name in ("upsampler", "clip", "decoder")}
  c = get_config("tiny")
  c.data.image_size = 56
  c.upsample.low_res_size = 28
  c.train.update(steps=1, checkpoint_every=1, eval_at_end=True)
  c.evals.upsampler.update(photos=("astronaut", "coffee"), crops=4)  # 8 crops: the split's program again
  c.evals.loss.every = -1
  upsampler = Trainer(c, root["upsampler"])
  state = upsampler.train()
  unclip_clip_run(root["clip"])
  return root, upsampler, state


def test_tiny_run_reports_psnr_and_ssim_next_to_bicubic(runs):
  root, upsampler, state = runs
  final = json.loads(open(os.path.join(root["upsampler"], "metrics.jsonl")).read().splitlines()[-1])
  for prefix in ("", "photos_"):
    for key in ("upsampler_psnr", "bicubic_psnr", "upsampler_ssim", "bicubic_ssim"):
      assert np.isfinite(final[f"eval/{prefix}{key}"]), prefix + key
  assert final["eval/examples"] == 8 and final["eval/photos_examples"] == 8
  assert final["eval/bicubic_psnr"] > 10 and 0 < final["eval/bicubic_ssim"] <= 1
  ctx = upsampler.model_context(state)
  low = np.zeros((8, 28, 28, 1), np.float32)  # the evaluation's chunk: its program again
  up = upsampler.task.upsample(ctx, low, seed=0)
  assert up.shape == (8, 56, 56, 1) and np.all(np.abs(up) <= 1)
  np.testing.assert_array_equal(up, upsampler.task.upsample(ctx, low, seed=0))
  with pytest.raises(ValueError, match=r"upsample takes images \[N, 28, 28, 1\], got shape \(8, 56, 56, 1\)"):
    upsampler.task.upsample(ctx, up, seed=0)


def test_sample_writes_bicubic_upsampled_original_triplets(runs):
  root, upsampler, state = runs
  out = upsampler.sample()
  index = [json.loads(line) for line in open(out["index"])]
  assert [r["prompt"] for r in index] == ["bicubic", "upsampled", "original"] * 8
  assert [r["example"] for r in index[:6]] == [0, 0, 0, 1, 1, 1] and "psnr" in index[0] and "psnr" not in index[2]


def _decoder_config(root, *upsamplers):
  c = unclip_config("tiny")
  c.text.clip_workdir = root["clip"]
  c.unclip.update(image_embedding="zero", upsampler_workdirs=tuple(upsamplers))
  return c


def test_decoder_chain_ends_with_the_upsampler_restored_frozen(runs):
  root, upsampler, state = runs
  decoder = Trainer(_decoder_config(root, root["upsampler"]), root["decoder"])
  ckpt = decoder.checkpointer()
  try:
    decoder_state, _ = decoder.restore_or_init(ckpt)  # a fresh decoder: the chain's shape is what is tested
  finally:
    ckpt.close()
  ctx = decoder.model_context(decoder_state)
  images = decoder.task.generate(ctx, ["a handwritten digit three"] * 2, seed=0)
  assert images.shape == (2, 56, 56, 1) and np.all(np.isfinite(images))
  got = weights.model_arrays(ctx.merge())
  ema = weights.model_arrays(upsampler.partition.merge(upsampler.graphdef, upsampler.frozen, state.ema,
                                                       state.mutable))
  names = [k for k in ema if k.startswith("denoiser.")]
  assert names
  for k in names:  # the upsampler run evaluates with its EMA, so the cascade restores that
    np.testing.assert_array_equal(got["upsamplers.0." + k], ema[k])
  trained = {k.split(".")[0] for u in decoder_state.params.values() for k in parts.flat_names(u)}
  assert trained == {"denoiser"}  # the upsampler is frozen: neither trained nor checkpointed by the decoder


def test_a_stage_that_takes_another_size_is_a_one_line_error(runs):
  root, *_ = runs
  with pytest.raises(ConfigError) as e:
    get_task(_decoder_config(root, root["upsampler"], root["upsampler"]))
  assert one_line(e.value) == (f"unclip.upsampler_workdirs[1]={root['upsampler']!r} upsamples 28px images of 1 "
                               "channels, but unclip.upsampler_workdirs[0] makes 56px images of 1")

"""Parity of the Stable Diffusion pipeline with diffusers' on a tiny random SD saved with `save_pretrained`.

One tiny diffusers pipeline (cross-attention U-Net, 4-level VAE so latents are 1/8 of the image as in SD, CLIP text
encoder with the real CLIP vocabulary, DDIM with SD's scheduler config) is built per module, saved, and loaded with
`pretrained.load_pipeline`. Both sides start from the same latents. Criterion (issue #4): images within 1/255 mean
absolute difference; the float images before quantisation are also compared, to 1e-4.

The VAE's posterior log-variance is pinned to its floor (std 3e-7) so that the encoder's posterior *sample*, drawn
from torch's generator there and JAX's here, is the same up to float noise for image-to-image and inpainting.
"""
import json
import os
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusion_jax import pretrained  # noqa: E402
from diffusion_jax.pipelines.latent_chain import SamplerSettings  # noqa: E402
from diffusion_jax.pipelines.stable_diffusion import StableDiffusionPipeline  # noqa: E402
from diffusion_jax.pretrained.weights import WeightsError  # noqa: E402
from diffusion_jax.tokenizer import write_vocab_and_merges  # noqa: E402
from tests.torch_parity import one_torch_thread, perturbed  # noqa: E402,F401 (autouse fixture)

PROMPTS = ["a photo of a cat", "an astronaut riding a horse on the moon"]
STEPS, GUIDANCE = 10, 7.5
SIZE, LATENT = 64, 8  # image side; latent side (SD's 1/8)
FLOAT_TOL = 1e-4  # max |ours - diffusers| of the float images in [0, 1]
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1)  # Stable Diffusion's own DDIM settings


def _tokenizer(folder):
  """A transformers CLIPTokenizer over the real CLIP vocabulary, from the BPE file open-clip-torch ships."""
  # A padded length below the encoder's 32 positions checks that model_max_length is honoured.
  return transformers.CLIPTokenizer(*write_vocab_and_merges(folder), model_max_length=20)


def _unet(in_channels, seed):
  torch.manual_seed(seed)
  return perturbed(diffusers.UNet2DConditionModel(
      sample_size=LATENT, in_channels=in_channels, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8), seed)


def sd_parts(root):
  """The diffusers pipeline's parts but the U-Net: a tiny VAE, CLIP text encoder and tokenizer, SD's DDIM."""
  torch.manual_seed(0)
  vae = perturbed(diffusers.AutoencoderKL(
      block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
      up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4, layers_per_block=1,
      sample_size=SIZE), 2)
  with torch.no_grad():  # posterior std exp(-15): see the module docstring
    vae.quant_conv.weight[4:] = 0.0
    vae.quant_conv.bias[4:] = -30.0
  text_encoder = perturbed(transformers.CLIPTextModel(transformers.CLIPTextConfig(
      hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
      max_position_embeddings=32)), 3)
  tokenizer = _tokenizer(str(root / "tokenizer_files"))
  return dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=diffusers.DDIMScheduler(**SCHEDULER),
              safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """{'sd': (folder, diffusers text-to-image pipeline), 'inpaint': (folder, diffusers inpainting pipeline)}."""
  root = tmp_path_factory.mktemp("sd")
  parts = sd_parts(root)
  out = {}
  for name, cls, unet in (("sd", diffusers.StableDiffusionPipeline, _unet(4, 1)),
                          ("inpaint", diffusers.StableDiffusionInpaintPipeline, _unet(9, 4))):
    pipe = cls(unet=unet, **parts)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(str(root / name))
    out[name] = (str(root / name), pipe)
  return out


@pytest.fixture(scope="module")
def pipe(reference):
  return pretrained.load_pipeline(reference["sd"][0])


def _latents(seed=0, batch=2):
  return np.random.default_rng(seed).standard_normal((batch, LATENT, LATENT, 4)).astype(np.float32)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _image_and_mask(batch=2):
  rng = np.random.default_rng(1)
  # A smooth image (the VAE sees structure, not noise) and a mask over the right part of the lower half.
  y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
  image = np.stack([0.5 + 0.4 * np.sin(6 * x + k) * np.cos(4 * y - k) for k in range(3)], -1)
  image = np.clip(image[None] + 0.05 * rng.standard_normal((batch, SIZE, SIZE, 3)), 0, 1).astype(np.float32)
  mask = np.zeros((batch, SIZE, SIZE, 1), np.float32)
  mask[:, SIZE // 2:, SIZE // 4:] = 1.0
  return image, mask


def _compare(ours_float, ref_float):
  """(max abs diff of the float images, mean abs diff of the uint8 images in 1/255 units); asserts both bounds."""
  assert ours_float.shape == ref_float.shape, (ours_float.shape, ref_float.shape)
  assert 0.05 < ref_float.std()  # not a blank image that would match anything
  max_float = float(np.abs(ours_float - ref_float).max())
  ours_u8 = (np.clip(ours_float, 0, 1) * 255).round().astype(np.int32)
  ref_u8 = (ref_float * 255).round().astype(np.int32)
  mean_u8 = float(np.abs(ours_u8 - ref_u8).mean())
  print(f"float max abs diff {max_float:.2e}; uint8 mean abs diff {mean_u8:.4f}/255, "
        f"max {np.abs(ours_u8 - ref_u8).max()}/255")
  assert max_float <= FLOAT_TOL
  assert mean_u8 <= 1.0
  return max_float, mean_u8


def test_text_to_image_matches_diffusers(reference, pipe):
  _, ref = reference["sd"]
  assert (pipe.sampler.name, pipe.max_length, pipe.default_size) == ("ddim", 20, SIZE)
  latents = _latents()
  expected = ref(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=_nchw(latents),
                 output_type="np").images
  ours = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=latents, output_type="float")
  _compare(ours, expected)
  images = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=latents)
  assert images.dtype == np.uint8 and images.shape == (2, SIZE, SIZE, 3)
  np.testing.assert_array_equal(images, (ours * 255).round().astype(np.uint8))


def test_a_generation_is_one_program_compiled_once(pipe):
  latents = _latents(1)
  first = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=latents)
  traces = pipe.trace_count
  events = []
  listener = lambda event, duration, **kw: events.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    # Another guidance scale and seed are traced values: the same program runs again, nothing is traced or compiled.
    second = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=3.0, seed=5, latents=latents)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert pipe.trace_count == traces
  assert not [e for e in events if "compile" in e or "trace" in e], events
  assert len(pipe._programs) == 1  # one jitted program holds encode + all steps + decode
  assert np.abs(first.astype(int) - second.astype(int)).mean() > 1  # the new scale did take effect


def test_img2img_with_euler_matches_diffusers(reference, pipe):
  """Image-to-image at strength 0.6 with the scheduler swapped for Euler on both sides (from the same config)."""
  folder, ref = reference["sd"]
  ref = diffusers.StableDiffusionImg2ImgPipeline(**ref.components)
  # From the saved file, as a user swaps schedulers on a downloaded folder: every field the file holds carries over
  # (an in-memory scheduler would instead drop the fields it was left at the default for, spacing included).
  ref.scheduler = diffusers.EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
  ref.set_progress_bar_config(disable=True)
  euler = pipe.with_sampler("euler")
  assert euler.sampler.name == "euler" and euler.sampler.options["timestep_spacing"] == "leading"
  image, _ = _image_and_mask()
  # diffusers draws the posterior sample, then the noise, from one generator; replay the second draw.
  generator = torch.Generator().manual_seed(0)
  torch.randn((2, 4, LATENT, LATENT), generator=generator)
  noise = torch.randn((2, 4, LATENT, LATENT), generator=generator).numpy().transpose(0, 2, 3, 1)
  expected = ref(PROMPTS, image=image, strength=0.6, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
  ours = euler.img2img(PROMPTS, image, strength=0.6, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                       latents=noise, output_type="float")
  _compare(ours, expected)


def test_inpaint_by_latent_blending_matches_diffusers(reference, pipe):
  """A plain 4-channel U-Net: diffusers re-imposes the noised known latents after every step, and so do we."""
  _, ref = reference["sd"]
  ref = diffusers.StableDiffusionInpaintPipeline(**ref.components)
  ref.set_progress_bar_config(disable=True)
  image, mask = _image_and_mask()
  latents = _latents(2)
  expected = ref(PROMPTS, image=image, mask_image=mask, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                 latents=_nchw(latents), output_type="np").images
  ours = pipe.inpaint(PROMPTS, image, mask, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=latents,
                      output_type="float")
  _compare(ours, expected)


def test_inpainting_unet_matches_diffusers(reference, pipe):
  folder, ref = reference["inpaint"]
  # The folder shares the text encoder and VAE with the other; loading only its U-Net saves seconds of CI.
  pipe = StableDiffusionPipeline(pipe.text_encoder, pretrained.load(os.path.join(folder, "unet")), pipe.vae,
                                 pipe.tokenizer, pipe.sampler, max_length=pipe.max_length)
  assert pipe.is_inpainting_unet
  image, mask = _image_and_mask()
  latents = _latents(3)
  expected = ref(PROMPTS, image=image, mask_image=mask, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                 latents=_nchw(latents), output_type="np").images
  ours = pipe.inpaint(PROMPTS, image, mask, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=latents,
                      output_type="float")
  _compare(ours, expected)
  with pytest.raises(ValueError, match="inpainting U-Net"):
    pipe(PROMPTS, num_inference_steps=STEPS)


def _copy(src, dst, drop=None, index_edit=None, scheduler=None):
  shutil.copytree(src, dst)
  if drop:
    shutil.rmtree(os.path.join(dst, drop))
  if index_edit or scheduler:
    path, edit = ((os.path.join(dst, "model_index.json"), index_edit) if index_edit else
                  (os.path.join(dst, "scheduler", "scheduler_config.json"), scheduler))
    with open(path) as f:
      config = json.load(f)
    edit(config)
    with open(path, "w") as f:
      json.dump(config, f)
  return str(dst)


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder", "tokenizer", "scheduler"])
def test_missing_component_is_one_line_error(reference, tmp_path, component):
  folder = _copy(reference["sd"][0], tmp_path / "sd", drop=component)
  with pytest.raises(WeightsError, match=f"missing component '{component}'") as info:
    pretrained.load_pipeline(folder)
  assert "\n" not in str(info.value)


def test_folder_errors(reference, tmp_path):
  with pytest.raises(WeightsError, match="model_index.json"):
    pretrained.load_pipeline(str(tmp_path))
  sdxl = _copy(reference["sd"][0], tmp_path / "xl",
               index_edit=lambda c: c.update(_class_name="StableDiffusionXLPipeline"))
  with pytest.raises(WeightsError, match="StableDiffusionXLPipeline"):
    pretrained.load_pipeline(sdxl)
  no_vae = _copy(reference["sd"][0], tmp_path / "novae", index_edit=lambda c: c.update(vae=[None, None]))
  with pytest.raises(WeightsError, match="no 'vae' component"):
    pretrained.load_pipeline(no_vae)
  lms = _copy(reference["sd"][0], tmp_path / "lms",
              scheduler=lambda c: c.update(_class_name="LMSDiscreteScheduler"))
  with pytest.raises(ValueError, match="LMSDiscreteScheduler"):
    pretrained.load_pipeline(lms)
  with pytest.raises(ValueError, match="unsupported _class_name='nope'"):
    pretrained.load_pipeline(reference["sd"][0], sampler="nope")


def test_scheduler_configs_map_to_samplers():
  sd15_pndm = dict(_class_name="PNDMScheduler", skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
                   **{k: v for k, v in SCHEDULER.items() if k.startswith("beta")})
  settings = SamplerSettings.from_scheduler_config(sd15_pndm)
  assert settings.name == "ddim" and settings.options["steps_offset"] == 1  # PLMS -> DDIM on the same steps
  dpm = settings.replace("DPMSolverMultistepScheduler", use_karras_sigmas=True)
  assert dpm.name == "dpmpp_2m" and dpm.options["use_karras_sigmas"]
  assert settings.replace("heun").scheduler_class == "HeunDiscreteScheduler"


def test_input_errors(pipe):
  with pytest.raises(ValueError, match="latents must be NHWC"):
    pipe(PROMPTS, num_inference_steps=2, latents=np.zeros((2, 4, LATENT, LATENT)))
  with pytest.raises(ValueError, match="multiples of 8"):
    pipe(PROMPTS, num_inference_steps=2, height=60)
  with pytest.raises(ValueError, match="no step to run"):
    pipe.img2img(PROMPTS, _image_and_mask()[0], strength=0.05, num_inference_steps=10)
  with pytest.raises(ValueError, match="negative prompts"):
    pipe(PROMPTS, num_inference_steps=2, negative_prompt=["x"])

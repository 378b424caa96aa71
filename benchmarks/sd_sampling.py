"""Whole text-to-image generation (tokenize, encode, N guided steps, VAE decode): ours against diffusers.

  python -m benchmarks.sd_sampling                 # the README table: 64x64 images, 20 DDIM steps, batch 1
  python -m benchmarks.sd_sampling --shape sd      # Stable Diffusion's proportions: 128 px, 32x32 latents, batch 4
  python -m benchmarks.sd_sampling --quick         # a smoke run (2 steps, 1 timed run)

The model is Stable Diffusion shaped but small enough for a CPU. `--shape tiny` (the default): a 4-level
cross-attention U-Net (32, 64, 128, 128) (two resnets per level, attention on the first three, as SD 1.x) and a
4-level VAE (latents 1/8 of the image) at 64 px: 8x8 latents, batch 1, where per-op overhead weighs most.
`--shape sd`: a 3-level U-Net (64, 128, 128) with cross-attention on the first two and a 3-level VAE at 128 px:
32x32 latents, batch 4, where the convolutions' arithmetic dominates as in real Stable Diffusion sampling. Both
have a CLIP text encoder with the real 49408-token vocabulary and 77 positions and SD's DDIM scheduler config.
diffusers builds it with random weights and saves it with `save_pretrained`; `pretrained.load_pipeline` loads the
same folder, so both rows run the same weights on the same latents (the script checks the images agree before
timing).

Rows:
  ours       `StableDiffusionPipeline.__call__`: one jitted program per setting, compiled on the first call (its
             time is reported separately and excluded from the row).
  diffusers  `diffusers.StableDiffusionPipeline.__call__` on PyTorch CPU, `torch.set_num_threads(--torch-threads)`,
             output_type='np' (no PIL conversion), safety checker off; one untimed warm-up call.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from benchmarks import common, op_profile

# Stable Diffusion 1.x's layout at toy widths.
UNET = dict(block_out_channels=(32, 64, 128, 128), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16)
# SD's proportions at a CPU's scale: wider levels, four times the latent area, a batch of prompts.
UNET_SD = dict(block_out_channels=(64, 128, 128), layers_per_block=2,
               down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2,
               cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32)
VAE = dict(block_out_channels=(32, 64, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=16, layers_per_block=2)
# A 3-level VAE (latents 1/4 of the image): 128 px images give 32x32 latents without a 256 px decode.
VAE_SD = dict(VAE, block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
              up_block_types=("UpDecoderBlock2D",) * 3)
SHAPES = {"tiny": dict(unet=UNET, vae=VAE, size=64, batch=1),
          "sd": dict(unet=UNET_SD, vae=VAE_SD, size=128, batch=4)}
TEXT = dict(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=4, vocab_size=49408,
            max_position_embeddings=77)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1)


def _tokenizer(folder):
  import transformers
  from diffusion_jax.tokenizer import write_vocab_and_merges
  return transformers.CLIPTokenizer(*write_vocab_and_merges(folder), model_max_length=77)


def latent_size(image_size: int, vae: dict) -> int:
  return image_size // 2 ** (len(vae["block_out_channels"]) - 1)


def build_reference(folder: str, image_size: int, unet: dict = UNET, vae: dict = VAE):
  """The diffusers pipeline with random weights (`unet`, `vae`: their diffusers configs), saved to `folder`/sd."""
  import diffusers
  import torch
  import transformers
  torch.manual_seed(0)
  latent = latent_size(image_size, vae)
  pipe = diffusers.StableDiffusionPipeline(
      unet=diffusers.UNet2DConditionModel(sample_size=latent, **unet).eval(),
      vae=diffusers.AutoencoderKL(sample_size=image_size, **vae).eval(),
      text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT)).eval(),
      tokenizer=_tokenizer(os.path.join(folder, "tokenizer_files")), scheduler=diffusers.DDIMScheduler(**SCHEDULER),
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  with torch.no_grad():  # diffusers zero-initialises some output layers; random images exercise the decode fully
    for p in pipe.unet.parameters():
      p.add_(0.02 * torch.randn_like(p))
  pipe.set_progress_bar_config(disable=True)
  pipe.save_pretrained(os.path.join(folder, "sd"))
  return pipe


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="the U-Net and its defaults below")
  parser.add_argument("--size", type=int, default=0, help="image side in pixels (0: the shape's)")
  parser.add_argument("--batch", type=int, default=0, help="prompts per call (0: the shape's)")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--guidance-scale", type=float, default=7.5)
  parser.add_argument("--repeats", type=int, default=5, help="timed calls per row; the median is reported")
  parser.add_argument("--torch-threads", type=int, default=common.DEFAULT_TORCH_THREADS)
  op_profile.add_flag(parser)
  parser.add_argument("--quick", action="store_true", help="smoke run: 2 steps, 1 timed call")
  args = parser.parse_args(argv)
  args.profile_dir = op_profile.dump_dir_for(args)
  if args.quick:
    args.steps, args.repeats = 2, 1
  shape = SHAPES[args.shape]
  args.size, args.batch = args.size or shape["size"], args.batch or shape["batch"]
  unet, vae = shape["unet"], shape["vae"]
  watch = common.OtherCpuUse()
  torch = common.setup_torch(args.torch_threads)
  from diffusion_jax import pretrained

  prompts = ["a photograph of an astronaut riding a horse", "a watercolour of a lighthouse at dawn"] * args.batch
  prompts = prompts[:args.batch]
  latent = latent_size(args.size, vae)
  latents = np.random.default_rng(0).standard_normal((args.batch, latent, latent, 4)).astype(np.float32)
  torch_latents = torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 3, 1, 2)))
  call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale)

  with tempfile.TemporaryDirectory() as tmp:
    ref = build_reference(tmp, args.size, unet, vae)
    ours = pretrained.load_pipeline(os.path.join(tmp, "sd"))

  run_ours = lambda: ours(prompts, latents=latents, output_type="float", **call)

  def run_ref():
    with torch.inference_mode():
      return ref(prompts, latents=torch_latents, output_type="np", **call).images

  start = time.perf_counter()
  first = run_ours()
  first_call = time.perf_counter() - start
  # Both rows must compute the same images, or the timing compares different work.
  diff = np.abs(first - run_ref())
  timing = dict(warmup=1, iters=1, repeats=args.repeats, sync=None)  # ours returns host numpy: already synced
  seconds = {"ours": common.time_per_call(run_ours, **timing)[0],
             "diffusers": common.time_per_call(run_ref, **timing)[0]}
  compile_s = first_call - seconds["ours"]

  rows = [[name, common.fmt(sec), common.fmt(1e3 * sec / args.steps), common.fmt(args.batch / sec),
           common.fmt(seconds["diffusers"] / sec) + "×"] for name, sec in seconds.items()]
  common.print_report(
      [f"Text-to-image, {args.size}x{args.size} images ({latent}x{latent} latents), batch {args.batch}, "
       f"DDIM {args.steps} steps, guidance {args.guidance_scale} (U-Net batch {2 * args.batch}), "
       f"median of {args.repeats} calls",
       f"U-Net {unet['block_out_channels']} x{unet['layers_per_block']} resnets, cross-attn width "
       f"{unet['cross_attention_dim']}; VAE {vae['block_out_channels']}; CLIP text {TEXT['num_hidden_layers']} "
       f"layers x {TEXT['hidden_size']}, 77 tokens"],
      watch, common.markdown_table(["row", "s/call", "ms/step", "images/s", "speed-up vs diffusers"], rows),
      notes=[f"ours vs diffusers images: max abs diff {diff.max():.2e}, mean {255 * diff.mean():.4f}/255",
             f"ours: first call {common.fmt(first_call)} s, of which compile (first call - median call) "
             f"{common.fmt(compile_s)} s"])

  op_profile.profile_rows({"ours": dict(call=run_ours)}, args)


if __name__ == "__main__":
  common.run(main)

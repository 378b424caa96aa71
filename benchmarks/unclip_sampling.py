"""Whole unCLIP chain (text encoder → prior → text projection → decoder → super-resolution): ours against diffusers.

  python -m benchmarks.unclip_sampling            # the README row: Karlo's layout at toy widths, diffusers' steps
  python -m benchmarks.unclip_sampling --quick    # a smoke run (2/2/2 steps, 1 timed call)

diffusers builds an UnCLIPPipeline with random weights (Karlo's component classes and schedulers: prior
fixed_small_log x_0 prediction, decoder learned_range ε, super-resolution fixed_small_log ε; decoder 32 px with
SimpleCrossAttn blocks, super-resolution 64 px) and saves it with `save_pretrained`; `pretrained.load_pipeline`
loads the same folder. Before timing, the script replays diffusers' per-step noise through our pipeline
(`step_noise`) and prints the difference of the two images, so both rows are known to do the same work.

Rows: ours (`UnCLIPPipeline.__call__`, one jitted program, compiled on the first call and reported separately);
diffusers (`UnCLIPPipeline.__call__` on PyTorch CPU, output_type='np', one untimed warm-up).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from benchmarks import common

EMBED, CROSS, TEXT_LEN = 64, 64, 77
SMALL, LARGE = 32, 64


def _parts(folder: str) -> dict:
  """The random-weight parts both Karlo pipelines share, and the prior (text-to-image only)."""
  import diffusers
  import torch
  import transformers
  from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
  from diffusion_jax.tokenizer import write_vocab_and_merges
  torch.manual_seed(0)

  super_res = dict(sample_size=LARGE, layers_per_block=2, down_block_types=("ResnetDownsampleBlock2D",) * 3,
                   up_block_types=("ResnetUpsampleBlock2D",) * 3, block_out_channels=(32, 64, 64), in_channels=6,
                   out_channels=3, norm_num_groups=16, resnet_time_scale_shift="scale_shift", add_attention=False)
  return dict(
      text_encoder=_shaken(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
          hidden_size=EMBED, projection_dim=EMBED, intermediate_size=256, num_attention_heads=4,
          num_hidden_layers=4, vocab_size=49408, max_position_embeddings=TEXT_LEN))),
      tokenizer=transformers.CLIPTokenizer(*write_vocab_and_merges(os.path.join(folder, "tok")),
                                           model_max_length=TEXT_LEN),
      prior=_shaken(diffusers.PriorTransformer(num_attention_heads=4, attention_head_dim=16, embedding_dim=EMBED,
                                              num_layers=4, num_embeddings=TEXT_LEN)),
      text_proj=_shaken(UnCLIPTextProjModel(clip_embeddings_dim=EMBED, time_embed_dim=128, cross_attention_dim=CROSS)),
      decoder=_shaken(diffusers.UNet2DConditionModel(
          sample_size=SMALL, in_channels=3, out_channels=6,
          down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
          up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
          mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64, 96), layers_per_block=2,
          cross_attention_dim=CROSS, attention_head_dim=16, resnet_time_scale_shift="scale_shift",
          class_embed_type="identity", norm_num_groups=16)),
      super_res_first=_shaken(diffusers.UNet2DModel(**super_res)),
      super_res_last=_shaken(diffusers.UNet2DModel(**super_res)),
      prior_scheduler=diffusers.UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                                clip_sample_range=5.0),
      decoder_scheduler=diffusers.UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon"),
      super_res_scheduler=diffusers.UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon"))


def _shaken(model):
  """diffusers zero-initialises some output layers; random outputs exercise every stage."""
  import torch
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
  return model.eval()


def build_reference(folder: str):
  """diffusers' UnCLIPPipeline with random weights, saved to `folder`/unclip."""
  import diffusers
  pipe = diffusers.UnCLIPPipeline(**_parts(folder))
  pipe.set_progress_bar_config(disable=True)
  pipe.save_pretrained(os.path.join(folder, "unclip"))
  return pipe


def build_variations(folder: str) -> str:
  """diffusers' UnCLIPImageVariationPipeline (Karlo's variations layout) with random weights, saved to
  `folder`/unclip_variations; returns that folder."""
  import diffusers
  import transformers
  parts = _parts(folder)
  for name in ("prior", "prior_scheduler"):
    del parts[name]
  image_encoder = _shaken(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
      hidden_size=EMBED, projection_dim=EMBED, num_hidden_layers=2, num_attention_heads=4, image_size=SMALL,
      intermediate_size=128, patch_size=8)))
  pipe = diffusers.UnCLIPImageVariationPipeline(
      image_encoder=image_encoder, feature_extractor=transformers.CLIPImageProcessor(crop_size=SMALL, size=SMALL),
      **parts)
  pipe.set_progress_bar_config(disable=True)
  out = os.path.join(folder, "unclip_variations")
  pipe.save_pretrained(out)
  return out


def recorded_step_noise(ref, call_ref, steps: dict[str, int]) -> tuple[np.ndarray, dict]:
  """diffusers' images and the per-step noise its schedulers drew, in our layout ({stage: [steps, ...]})."""
  from diffusers.schedulers import scheduling_unclip
  original, draws = scheduling_unclip.randn_tensor, []

  def record(*args, **kwargs):
    x = original(*args, **kwargs)
    draws.append(x.numpy().copy())
    return x

  scheduling_unclip.randn_tensor = record
  try:
    images = call_ref()
  finally:
    scheduling_unclip.randn_tensor = original
  out, i = {}, 0
  for stage, n in steps.items():
    rows = [r.transpose(0, 2, 3, 1) if r.ndim == 4 else r for r in draws[i:i + n - 1]]
    i += n - 1
    out[stage] = np.stack(rows + [np.zeros_like(rows[0])])
  return images, out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=1, help="prompts per call")
  parser.add_argument("--prior-steps", type=int, default=25)
  parser.add_argument("--decoder-steps", type=int, default=25)
  parser.add_argument("--super-res-steps", type=int, default=7)
  parser.add_argument("--repeats", type=int, default=3, help="timed calls per row; the median is reported")
  parser.add_argument("--torch-threads", type=int, default=common.DEFAULT_TORCH_THREADS)
  parser.add_argument("--quick", action="store_true", help="smoke run: 2 steps per stage, 1 timed call")
  args = parser.parse_args(argv)
  if args.quick:
    args.prior_steps = args.decoder_steps = args.super_res_steps = 2
    args.repeats = 1
  watch = common.OtherCpuUse()
  torch = common.setup_torch(args.torch_threads)
  from diffusion_jax import pretrained

  prompts = (["a high-resolution photograph of a cat", "a watercolour of a lighthouse at dawn"] * args.batch)
  prompts = prompts[:args.batch]
  rng = np.random.default_rng(0)
  latents = {"prior_latents": rng.standard_normal((args.batch, EMBED)).astype(np.float32),
             "decoder_latents": rng.standard_normal((args.batch, SMALL, SMALL, 3)).astype(np.float32),
             "super_res_latents": rng.standard_normal((args.batch, LARGE, LARGE, 3)).astype(np.float32)}
  torch_latents = {k: torch.from_numpy(np.ascontiguousarray(v.transpose(0, 3, 1, 2) if v.ndim == 4 else v))
                   for k, v in latents.items()}
  steps = dict(prior_num_inference_steps=args.prior_steps, decoder_num_inference_steps=args.decoder_steps,
               super_res_num_inference_steps=args.super_res_steps)

  with tempfile.TemporaryDirectory() as tmp:
    ref = build_reference(tmp)
    ours = pretrained.load_pipeline(os.path.join(tmp, "unclip"))

  def run_ref():
    with torch.inference_mode():
      return ref(prompts, output_type="np", **steps, **torch_latents).images

  expected, noise = recorded_step_noise(ref, run_ref, {"prior": args.prior_steps, "decoder": args.decoder_steps,
                                                       "super_res": args.super_res_steps})
  start = time.perf_counter()
  replayed = ours(prompts, output_type="float", step_noise=noise, **steps, **latents)
  first_call = time.perf_counter() - start
  diff = np.abs(replayed - expected)
  run_ours = lambda: ours(prompts, output_type="float", step_noise=noise, **steps, **latents)
  timing = dict(warmup=1, iters=1, repeats=args.repeats, sync=None)
  seconds = {"ours": common.time_per_call(run_ours, **timing)[0],
             "diffusers": common.time_per_call(run_ref, **timing)[0]}
  total_steps = args.prior_steps + args.decoder_steps + args.super_res_steps
  rows = [[name, common.fmt(sec), common.fmt(1e3 * sec / total_steps), common.fmt(args.batch / sec),
           common.fmt(seconds["diffusers"] / sec) + "×"] for name, sec in seconds.items()]
  common.print_report(
      [f"unCLIP text-to-image, batch {args.batch}: prior {args.prior_steps} + decoder {args.decoder_steps} "
       f"({SMALL} px) + super-resolution {args.super_res_steps} ({LARGE} px) steps, guidance 4 / 8, median of "
       f"{args.repeats} calls",
       f"Karlo's classes at toy widths: CLIP text 4 x {EMBED}, prior 4 layers x {EMBED}, decoder (32, 64, 96) "
       f"SimpleCrossAttn, super-res (32, 64, 64) x2 resnets"],
      watch, common.markdown_table(["row", "s/call", "ms/step", "images/s", "speed-up vs diffusers"], rows),
      notes=[f"ours vs diffusers images (diffusers' step noise replayed): max abs diff {diff.max():.2e}, mean "
             f"{255 * diff.mean():.4f}/255",
             f"ours: first call {common.fmt(first_call)} s (includes compilation)"])


if __name__ == "__main__":
  common.run(main)

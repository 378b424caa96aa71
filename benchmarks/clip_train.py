"""CLIP training-step throughput: ours (JAX) against transformers' CLIPModel (PyTorch), and our whole trainer step.

  python -m benchmarks.clip_train                            # configs/mnist_clip.py's model, batch 256
  python -m benchmarks.clip_train --config configs/emoji_clip.py --batch 128
  python -m benchmarks.clip_train --quick                    # a seconds-long smoke run

Rows (same batch, same random images and captions, same weights):
  jax-clip           our CLIPModel: both towers, symmetric InfoNCE, backward and AdamW in one jitted program with
                     donated state.
  transformers-clip  transformers' CLIPModel loaded from our export of the same weights (`save_transformers`),
                     the same loss written in torch, torch AdamW, torch.set_num_threads(2).
  jax-trainer        `Trainer.compile_train_step` of the config: what `python -m diffusion_jax.main` runs per step
                     (adds gradient clipping, the weight-decay mask, metrics and the valid-example mask).
GFLOP/s is XLA's cost-analysis count of the jax-clip step times steps/s (the torch row reuses it, so its GFLOP/s
ratio equals its images/s ratio); "% peak" divides by the machine's float32 matmul peak.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import tempfile

import numpy as np
from flax import nnx

from benchmarks import common, op_profile
from diffusion_jax.contrastive import losses

LR = 1e-4  # plain AdamW on both sides


def load_config(path: str, batch: int):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.train.batch_size = batch
  config.mesh.shape = (1, 1, 1)
  return config


def random_batch(config, tokenizer, batch: int) -> dict[str, np.ndarray]:
  d = config.data
  rng = np.random.default_rng(0)
  words = ["digit", "photo", "zero", "seven", "a", "handwritten", "of", "the", "black", "white"]
  captions = [" ".join(rng.choice(words, size=rng.integers(2, 8))) for _ in range(batch)]
  return dict(image=rng.uniform(-1, 1, (batch, d.image_size, d.image_size, d.channels)).astype(np.float32),
              tokens=tokenizer(captions, d.max_text_len), label=np.zeros((batch,), np.int32),
              valid=np.ones((batch,), np.float32))


def bench_jax(model, inputs, args) -> dict:
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(p, batch):
    m = nnx.merge(graphdef, p, rest)
    loss, _ = losses.clip_loss(m.encode_image(batch["image"]), m.encode_text(batch["tokens"]), m.temperature())
    return loss

  return common.time_adamw_step(loss_fn, params, {k: inputs[k] for k in ("image", "tokens")}, args, lr=LR)


def bench_transformers(folder, inputs, args) -> dict:
  torch = common.setup_torch(args.torch_threads)
  import transformers
  model = transformers.CLIPModel.from_pretrained(folder)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
  # NHWC -> NCHW, as transformers expects
  pixels = torch.from_numpy(np.ascontiguousarray(inputs["image"].transpose(0, 3, 1, 2)))
  ids = torch.from_numpy(inputs["tokens"].astype(np.int64))
  labels = torch.arange(len(ids))

  def step():
    opt.zero_grad(set_to_none=True)
    img = model.get_image_features(pixel_values=pixels)
    txt = model.get_text_features(input_ids=ids)
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    logits = model.logit_scale.exp().clamp(max=100) * img @ txt.t()
    loss = (torch.nn.functional.cross_entropy(logits, labels)
            + torch.nn.functional.cross_entropy(logits.t(), labels)) / 2
    loss.backward()
    opt.step()
    return loss

  seconds, _ = common.time_per_call(step, warmup=args.warmup, iters=args.steps, repeats=args.repeats, sync=None)
  return dict(seconds=seconds, params=sum(p.numel() for p in model.parameters()))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/mnist_clip.py")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--steps", type=int, default=5, help="timed steps per window")
  parser.add_argument("--repeats", type=int, default=3, help="timed windows; the median is reported")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--torch-threads", type=int, default=common.DEFAULT_TORCH_THREADS)
  parser.add_argument("--skip", default="", help="comma-separated rows to leave out")
  op_profile.add_flag(parser)
  parser.add_argument("--quick", action="store_true", help="smoke run: batch 16, 1 step, 1 window")
  args = parser.parse_args(argv)
  args.profile_dir = op_profile.dump_dir_for(args)
  watch = common.OtherCpuUse()
  if args.quick:
    args.batch, args.steps, args.repeats, args.warmup = 16, 1, 1, 1
  skip = set(filter(None, args.skip.split(",")))

  from diffusion_jax.data import tokenizers
  from diffusion_jax.models.clip import CLIPModel
  from diffusion_jax.pretrained.clip import save_transformers
  from diffusion_jax.tasks.contrastive import clip_config
  config = load_config(args.config, args.batch)
  tokenizer = tokenizers.get_tokenizer(config.data.tokenizer)
  cfg = clip_config(config, tokenizer)
  # transformers pools the caption at its end token only when that id is not 2; argmax pooling costs the same.
  export_cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, pooling="argmax",
                                                                 eos_token_id=cfg.text.vocab_size - 1))
  model = CLIPModel(export_cfg, rngs=nnx.Rngs(0))
  inputs = random_batch(config, tokenizer, args.batch)
  n = 256 if args.quick else 2048
  machine_peak, peak_line = common.peak_summary(common.measure_matmul_peak(n, torch_threads=args.torch_threads), n)

  results = {}
  with tempfile.TemporaryDirectory() as folder:
    save_transformers(model, folder)
    if "jax-clip" not in skip:
      results["jax-clip"] = bench_jax(model, inputs, args)
    if "transformers-clip" not in skip:
      results["transformers-clip"] = bench_transformers(folder, inputs, args)
  if "jax-trainer" not in skip:
    results["jax-trainer"] = common.time_trainer_step(config, inputs, args)

  rows = common.throughput_rows(results, baseline="transformers-clip", batch=args.batch, peak=machine_peak,
                                default_flops=results.get("jax-clip", {}).get("flops", 0.0))

  v, t = cfg.vision, cfg.text
  common.print_report(
      [f"CLIP training step, {args.config}, batch {args.batch}, median of {args.repeats} windows of "
       f"{args.steps} steps",
       f"vision: {v.image_size}px/{v.patch_size} patches, width {v.width}, {v.layers} layers, {v.heads} heads; "
       f"text: {t.context_length} tokens, width {t.width}, {t.layers} layers, vocab {t.vocab_size}; "
       f"embed {cfg.embed_dim}"],
      watch, common.markdown_table(
          ["row", "params", "steps/s", "images/s", "GFLOP/step", "GFLOP/s", "% peak", "vs transformers"], rows),
      notes=[peak_line])

  op_profile.profile_rows(results, args)


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  common.run(main)

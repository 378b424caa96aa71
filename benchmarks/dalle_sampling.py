"""DALL-E 1 sampling: image tokens per second of the KV-cached sampler against recomputing the whole prefix at every
token, and against a PyTorch transformer of the same size (transformers' GPT-2) with and without its KV cache, in
one run.

  python -m benchmarks.dalle_sampling              # configs/mnist_dalle.py's transformer: width 128, 4 layers,
                                                   # 16 caption tokens + image start, 49 codes
  python -m benchmarks.dalle_sampling --quick      # a seconds-long smoke run

Rows (greedy, exactly the image's codes after a random caption; batches 16 and 64 by default):
  jax-cached            `Dalle` driven by `autoregressive.sampler.sample_traced` (prefill, then one token per
                        `lax.while_loop` step against the cache), one jitted program; compile excluded and printed.
  jax-cached-guided     `Dalle.sample` with guidance 3 as the task samples: the same loop over 2B rows (caption and
                        empty caption), so its tokens/s counts the B images drawn.
  jax-recompute         the same model without a cache: each new token runs the whole sequence so far again
                        (a `lax.fori_loop` over full causal passes of the fixed-length sequence), one jitted program.
  torch-cached          transformers' GPT2LMHeadModel of the same width, depth, heads, MLP and vocabulary,
                        `generate(do_sample=False, use_cache=True)`, eager, torch.set_num_threads(2).
  torch-recompute       the same with `use_cache=False`.
"vs torch-cached" is tokens/s over torch-cached's at the same batch. GFLOP/s counts the useful work of drawing the
image once with a cache (every weight matrix, 2 FLOPs per multiply-add, LM head included, and causal attention over
the keys each token sees; twice that for the guided row's 2B rows) over each row's time, so the recompute rows show
how much of their time is spent on work a cache avoids; "% peak" divides it by the float32 matmul peak.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import common


def build_dalle(args):
  from diffusion_jax.models.dalle import Dalle, DalleConfig
  from diffusion_jax.models.decoder import DecoderConfig
  lm = DecoderConfig(width=args.width, layers=args.layers, heads=args.heads, mlp_dim=args.mlp, act="gelu",
                     norm="layer")
  cfg = DalleConfig.build(lm, text_vocab=args.text_vocab, text_len=args.text_len, codes=args.codes,
                          grid=(args.side, args.side))
  return Dalle(cfg, rngs=nnx.Rngs(0))


def useful_flops(args, batch: int) -> float:
  """FLOPs of one cached draw of `batch` images: a prefill of the prompt, then one token per step."""
  w, vocab = args.width, args.codes + 1 + args.text_vocab
  per_token = args.layers * (4 * w * w + 2 * w * args.mlp) + w * vocab
  prompt, new = args.text_len + 1, args.side ** 2
  tokens = prompt + new - 1  # the last drawn code is never fed back
  keys = tokens * (tokens + 1) // 2  # token i attends to i + 1 keys
  return batch * (2.0 * per_token * tokens + 4.0 * args.layers * w * keys)


def jax_runs(model, text: np.ndarray):
  """{row: fn() -> codes} of the three JAX rows for captions `text` [B, L]."""
  from diffusion_jax.autoregressive import sampler
  cfg = model.config
  graphdef, state = nnx.split(model)
  b = text.shape[0]
  null = np.zeros((1, cfg.text_len), np.int32)

  @jax.jit
  def cached(state, text):
    m = nnx.merge(graphdef, state)
    prompt = m.sequence(text, jnp.zeros((b, 0), jnp.int32))
    config = sampler.SamplingConfig(max_new_tokens=cfg.image_len)
    return sampler.sample_traced(m, prompt, jnp.full((b,), prompt.shape[1], jnp.int32), jax.random.key(0),
                                 config=config).tokens

  @jax.jit
  def guided(state, text):
    return nnx.merge(graphdef, state).sample(text, jnp.asarray(null), jax.random.key(0), guidance_scale=3.0,
                                             temperature=0.0)

  @jax.jit
  def recompute(state, text):
    m = nnx.merge(graphdef, state)
    seq = m.sequence(text, jnp.zeros((b, cfg.image_len), jnp.int32))  # the codes' slots are filled in turn
    positions = jnp.broadcast_to(jnp.arange(seq.shape[1] - 1), (b, seq.shape[1] - 1))

    def step(i, seq):
      ids = seq[:, :-1]
      logits = m.lm(ids, positions, embeddings=m.embed(ids, positions))  # causal: later slots do not matter
      token = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, cfg.text_len + i, axis=1, keepdims=False), axis=-1)
      return jax.lax.dynamic_update_index_in_dim(seq, token.astype(jnp.int32), cfg.prompt_len + i, axis=1)

    return jax.lax.fori_loop(0, cfg.image_len, step, seq)[:, cfg.prompt_len:]

  text = jnp.asarray(text)
  return {"jax-cached": lambda: cached(state, text), "jax-cached-guided": lambda: guided(state, text),
          "jax-recompute": lambda: recompute(state, text)}


def torch_runs(args, text: np.ndarray):
  import torch
  import transformers
  torch.manual_seed(0)
  vocab = args.codes + 1 + args.text_vocab
  gpt = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=vocab, n_positions=args.text_len + 1 + args.side ** 2, n_embd=args.width, n_layer=args.layers,
      n_head=args.heads, n_inner=args.mlp, activation_function="gelu")).eval()
  gpt.generation_config.eos_token_id = None
  gpt.generation_config.pad_token_id = 0
  ids = torch.from_numpy(np.concatenate([text + args.codes + 1, np.full((len(text), 1), args.codes)], 1)
                         .astype(np.int64))
  mask = torch.ones_like(ids)
  n = args.side ** 2

  def run(cache):
    with torch.no_grad():
      return gpt.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                          use_cache=cache)

  return {"torch-cached": lambda: run(True), "torch-recompute": lambda: run(False)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--mlp", type=int, default=512)
  parser.add_argument("--text-vocab", type=int, default=64)
  parser.add_argument("--text-len", type=int, default=16)
  parser.add_argument("--codes", type=int, default=256)
  parser.add_argument("--side", type=int, default=7, help="the code grid is side × side")
  parser.add_argument("--batches", default="16,64")
  parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported")
  parser.add_argument("--torch-threads", type=int, default=common.DEFAULT_TORCH_THREADS)
  parser.add_argument("--quick", action="store_true", help="smoke run: 1 layer, batch 4, 4 × 4 codes, 1 run")
  args = parser.parse_args(argv)
  if args.quick:
    args.layers, args.side, args.batches, args.repeats = 1, 4, "4", 1
  watch = common.OtherCpuUse()
  common.setup_torch(args.torch_threads)
  model = build_dalle(args)
  n = 256 if args.quick else 2048
  machine_peak, peak_line = common.peak_summary(common.measure_matmul_peak(n, torch_threads=args.torch_threads), n)
  rng = np.random.default_rng(0)
  rows, new = [], args.side ** 2
  for batch in (int(b) for b in args.batches.split(",")):
    text = rng.integers(1, args.text_vocab, (batch, args.text_len), dtype=np.int32)
    results = {}
    for name, run in {**jax_runs(model, text), **torch_runs(args, text)}.items():
      t0 = time.perf_counter()
      jax.block_until_ready(run()) if name.startswith("jax") else run()
      first = time.perf_counter() - t0
      seconds, _ = common.time_per_call(run, warmup=0, iters=1, repeats=args.repeats,
                                        **({"sync": None} if name.startswith("torch") else {}))
      results[name] = (seconds, first - seconds if name.startswith("jax") else None)
    base = batch * new / results["torch-cached"][0]
    for name, (seconds, compile_s) in results.items():
      rate = batch * new / seconds
      gflops = useful_flops(args, 2 * batch if name.endswith("guided") else batch) / seconds / 1e9
      rows.append([name, batch, common.fmt(rate), common.fmt(1000 * seconds / new), common.fmt(gflops),
                   f"{100 * gflops / machine_peak:.1f}%", common.fmt(rate / base) + "×",
                   common.fmt(compile_s) if compile_s is not None else "-"])
  table = common.markdown_table(["row", "batch", "image tokens/s", "ms/token", "GFLOP/s", "% peak", "vs torch-cached",
                                 "compile s"], rows)
  common.print_report([f"DALL-E sampling: width {args.width}, {args.layers} layers, {args.heads} heads, MLP "
                       f"{args.mlp}, {args.text_len} caption tokens + image start, {new} codes ({args.codes}-code "
                       "codebook)"], watch, table, notes=[peak_line])


if __name__ == "__main__":
  common.run(main)

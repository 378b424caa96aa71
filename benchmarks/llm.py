"""Llama-style decoder LM: training step and KV-cache greedy generation, ours (JAX) against transformers'
LlamaForCausalLM (PyTorch) on the same small config and the same weights, in one run.

  python -m benchmarks.llm                      # vocab 4096, width 256, 4 layers, 8/4 heads, MLP 688, seq 256
  python -m benchmarks.llm --layers 8 --batch 8
  python -m benchmarks.llm --quick              # a seconds-long smoke run (2 layers, short sequences)

transformers builds the model (its random init, `torch.manual_seed(0)`); our DecoderLM gets a copy of its weights,
and the script prints the largest logit difference of one forward pass before timing anything.

Training rows (same batch of random tokens, next-token cross-entropy, plain AdamW):
  jax-train           DecoderLM forward + backward + optax.adamw in one jitted program with donated state
                      (`common.time_adamw_step`).
  transformers-train  LlamaForCausalLM(input_ids, labels=input_ids).loss, backward, torch.optim.AdamW, eager,
                      torch.set_num_threads(2).
GFLOP/step is XLA's cost-analysis count of the jax-train step (the torch row reuses it, so its GFLOP/s ratio equals
its tokens/s ratio); "% peak" divides GFLOP/s by the machine's float32 matmul peak.

Generation rows (greedy, a prompt of random tokens, exactly --new-tokens new tokens, batch 1 and 16 by default):
  jax-generate           `autoregressive.Sampler`: prefill plus a `lax.while_loop` over the new tokens, one jitted
                         program; its compile is excluded (warm-up), and printed.
  transformers-generate  `model.generate(do_sample=False, max_new_tokens=N, min_new_tokens=N, use_cache=True)`
                         (DynamicCache, sdpa attention), under the same thread count.
Both stop only at N tokens (no end-of-sequence token), and the script prints whether both chose the same tokens.
Their GFLOP/s uses an analytic count of the useful work (matmul weights × 2 per token, causal attention over the
keys each token sees); it is far below the peak at batch 1, where decoding is bound by memory and dispatch.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks import common

LR = 1e-4  # plain AdamW on both sides

def decoder_config(args):
  from diffusion_jax.models.decoder import DecoderConfig
  return DecoderConfig(vocab_size=args.vocab, width=args.hidden, layers=args.layers, heads=args.heads,
                       kv_heads=args.kv_heads, mlp_dim=args.intermediate, act="silu", gated_mlp=True, norm="rms",
                       norm_eps=1e-5, positions="rope", rope_theta=10000.0, qkv_bias=False, out_bias=False,
                       tie_embeddings=False)


def build_llama(cfg, max_len: int):
  """transformers' LlamaForCausalLM of `cfg` (a DecoderConfig), randomly initialised, in eval mode."""
  import torch
  import transformers
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.layers,
      num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads, rms_norm_eps=cfg.norm_eps,
      rope_theta=cfg.rope_theta, max_position_embeddings=max_len, tie_word_embeddings=False,
      attention_bias=False, mlp_bias=False))
  # No end-of-sequence token: generate() then runs to max_new_tokens, as our Sampler without stop_tokens does.
  # (With one, min_new_tokens would mask its logit, and greedy picks could differ from ours.)
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  return model.eval()


def llama_to_ours(llama, cfg):
  """A DecoderLM holding the weights of transformers' Llama `llama`: saved with its own `save_pretrained` and read
  back by `pretrained.load`, the loader users run, so the benchmark compares the model users get."""
  import tempfile

  from diffusion_jax import pretrained
  with tempfile.TemporaryDirectory() as folder:
    llama.save_pretrained(folder, safe_serialization=True)
    model = pretrained.load(folder)
  # max_len is informational for rotary positions: the folder stores max_position_embeddings there.
  if dataclasses.replace(model.config, max_len=cfg.max_len) != cfg:
    raise AssertionError(f"the loaded config differs from the benchmark's: {model.config} vs {cfg}")
  return model


def forward_flops(cfg, new: int, past: int = 0) -> float:
  """Useful FLOPs of a forward pass over `new` tokens that follow `past` cached ones: 2 per multiply-add of every
  weight matrix (embedding lookup excluded, LM head included) and causal attention (QK^T and AV, each token over
  the keys up to itself). Training is 3× this (backward twice the forward)."""
  head_dim = cfg.width // cfg.heads
  kv = (cfg.kv_heads or cfg.heads) * head_dim
  per_layer = 2 * cfg.width * cfg.width + 2 * cfg.width * kv + 3 * cfg.width * cfg.mlp_dim
  weights = cfg.layers * per_layer + cfg.width * cfg.vocab_size
  keys_seen = new * past + new * (new + 1) // 2  # token i of the new ones sees past + i + 1 keys
  return 2.0 * weights * new + 4.0 * cfg.layers * cfg.width * keys_seen


def check_parity(model, llama, tokens: np.ndarray) -> tuple[float, float, float]:
  """(largest |logit difference|, our loss, transformers' loss) of one forward pass over `tokens`."""
  import torch
  graphdef, state = nnx.split(model)
  ours = np.asarray(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, jnp.asarray(tokens)))
  with torch.no_grad():
    out = llama(torch.from_numpy(tokens.astype(np.int64)), labels=torch.from_numpy(tokens.astype(np.int64)))
  theirs = out.logits.float().numpy()
  return float(np.max(np.abs(ours - theirs))), float(next_token_loss(ours, tokens)), float(out.loss)


def next_token_loss(logits, tokens):
  """Mean cross-entropy of token t+1 given tokens up to t (what transformers' `labels=input_ids` computes)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


def bench_jax_train(model, tokens, args) -> dict:
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(p, batch):
    return next_token_loss(nnx.merge(graphdef, p, rest)(batch["tokens"]), batch["tokens"])

  return common.time_adamw_step(loss_fn, params, {"tokens": tokens}, args, lr=LR)


def bench_torch_train(llama, tokens, args) -> dict:
  import torch
  llama.train()
  opt = torch.optim.AdamW(llama.parameters(), lr=LR, weight_decay=0.0)
  ids = torch.from_numpy(tokens.astype(np.int64))

  def step():
    opt.zero_grad(set_to_none=True)
    loss = llama(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    return loss

  seconds, _ = common.time_per_call(step, warmup=args.warmup, iters=args.steps, repeats=args.repeats, sync=None)
  return dict(seconds=seconds, params=sum(p.numel() for p in llama.parameters()))


def bench_jax_generate(model, prompts, args) -> dict:
  from diffusion_jax.autoregressive.sampler import Sampler, SamplingConfig
  sampler, config = Sampler(model), SamplingConfig(max_new_tokens=args.new_tokens)
  lengths = np.full(prompts.shape[:1], prompts.shape[1], np.int32)  # random prompts may hold the pad id 0
  run = lambda: sampler(prompts, lengths, config=config)
  t0 = time.perf_counter()
  jax.block_until_ready(run())
  first_call = time.perf_counter() - t0
  # One run per window: independent runs could overlap under asynchronous dispatch.
  seconds, _ = common.time_per_call(run, warmup=1, iters=1, repeats=args.gen_repeats)
  return dict(seconds=seconds, tokens=np.asarray(run().tokens), compile_seconds=first_call - seconds)


def bench_torch_generate(llama, prompts, args) -> dict:
  import torch
  llama.eval()
  ids = torch.from_numpy(prompts.astype(np.int64))
  mask = torch.ones_like(ids)
  n = args.new_tokens
  run = lambda: llama.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                               min_new_tokens=n, use_cache=True)
  seconds, _ = common.time_per_call(run, warmup=1, iters=1, repeats=args.gen_repeats, sync=None)
  return dict(seconds=seconds, tokens=run()[:, prompts.shape[1]:].numpy())


def training_rows(results, args, peak) -> list[list]:
  """`common.throughput_rows` (tokens in place of images) with ms/step after steps/s."""
  rows = common.throughput_rows(results, baseline="transformers-train", batch=args.batch * args.seq, peak=peak,
                                default_flops=results.get("jax-train", {}).get("flops", 0.0))
  for row, r in zip(rows, results.values()):
    row.insert(3, common.fmt(1000 * r["seconds"]))
  return rows


def generation_rows(results, cfg, args, peak) -> list[list]:
  rows = []
  for (name, batch), r in results.items():
    flops = batch * (forward_flops(cfg, args.prompt_len)
                     + sum(forward_flops(cfg, 1, args.prompt_len + i) for i in range(args.new_tokens - 1)))
    base = results.get(("transformers-generate", batch))
    gflops = flops / r["seconds"] / 1e9
    rows.append([name, batch, common.fmt(batch * args.new_tokens / r["seconds"]), common.fmt(r["seconds"]),
                 common.fmt(1000 * r["seconds"] / args.new_tokens), common.fmt(gflops),
                 f"{100 * gflops / peak:.1f}%", common.fmt(base["seconds"] / r["seconds"]) + "×" if base else "-",
                 common.fmt(r["compile_seconds"]) if "compile_seconds" in r else "-"])
  return rows


def same_tokens(results, batch) -> str:
  ours, theirs = results.get(("jax-generate", batch)), results.get(("transformers-generate", batch))
  if not ours or not theirs:
    return f"batch {batch}: not compared"
  equal = ours["tokens"] == theirs["tokens"]
  rows = int(np.sum(np.all(equal, axis=1)))
  first = np.argwhere(~equal)
  where = "" if not len(first) else f", first difference at row {first[0][0]} token {first[0][1]}"
  return f"batch {batch}: {'identical' if equal.all() else 'DIFFERENT'} ({rows}/{len(equal)} rows equal{where})"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--vocab", type=int, default=4096)
  parser.add_argument("--hidden", type=int, default=256)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--kv-heads", type=int, default=4)
  parser.add_argument("--intermediate", type=int, default=688)
  parser.add_argument("--seq", type=int, default=256, help="training sequence length")
  parser.add_argument("--batch", type=int, default=16, help="training batch")
  parser.add_argument("--prompt-len", type=int, default=32)
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--gen-batches", default="1,16", help="comma-separated generation batch sizes")
  parser.add_argument("--steps", type=int, default=3, help="timed training steps per window")
  parser.add_argument("--repeats", type=int, default=3, help="timed training windows; the median is reported")
  parser.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
  parser.add_argument("--gen-repeats", type=int, default=3, help="timed generation runs; the median is reported")
  parser.add_argument("--torch-threads", type=int, default=common.DEFAULT_TORCH_THREADS)
  parser.add_argument("--skip", default="", help="comma-separated rows to leave out: jax-train, "
                      "transformers-train, jax-generate, transformers-generate")
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: 2 layers, batch 4 × 64 tokens, 8-token prompts, 16 new tokens, 1 window")
  args = parser.parse_args(argv)
  watch = common.OtherCpuUse()
  if args.quick:
    args.layers, args.batch, args.seq, args.prompt_len, args.new_tokens = 2, 4, 64, 8, 16
    args.steps, args.repeats, args.warmup, args.gen_repeats = 1, 1, 1, 1
  skip = set(filter(None, args.skip.split(",")))
  gen_batches = [int(b) for b in args.gen_batches.split(",")]

  common.setup_torch(args.torch_threads)
  import transformers
  cfg = decoder_config(args)
  llama = build_llama(cfg, max(args.seq, args.prompt_len + args.new_tokens))
  model = llama_to_ours(llama, cfg)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (args.batch, args.seq), dtype=np.int32)
  prompts = rng.integers(0, cfg.vocab_size, (max(gen_batches), args.prompt_len), dtype=np.int32)
  diff, our_loss, their_loss = check_parity(model, llama, tokens[:2])
  n = 256 if args.quick else 2048
  machine_peak, peak_line = common.peak_summary(common.measure_matmul_peak(n, torch_threads=args.torch_threads), n)

  generated = {}
  for batch in gen_batches:
    if "jax-generate" not in skip:
      generated[("jax-generate", batch)] = bench_jax_generate(model, prompts[:batch], args)
    if "transformers-generate" not in skip:
      generated[("transformers-generate", batch)] = bench_torch_generate(llama, prompts[:batch], args)
  # Training last: it donates our parameters and moves transformers' weights.
  trained = {}
  if "jax-train" not in skip:
    trained["jax-train"] = bench_jax_train(model, tokens, args)
  if "transformers-train" not in skip:
    trained["transformers-train"] = bench_torch_train(llama, tokens, args)

  kv = cfg.kv_heads or cfg.heads
  analytic = 3 * forward_flops(cfg, args.seq) * args.batch / 1e9
  train_table = common.markdown_table(
      ["row", "params", "steps/s", "ms/step", "tokens/s", "GFLOP/step", "GFLOP/s", "% peak", "vs transformers"],
      training_rows(trained, args, machine_peak))
  generate_table = common.markdown_table(
      ["row", "batch", "new tokens/s", "s/run", "ms/token", "GFLOP/s", "% peak", "vs transformers", "compile s"],
      generation_rows(generated, cfg, args, machine_peak))
  common.print_report(
      [f"Llama-style LM against transformers {transformers.__version__} LlamaForCausalLM, same weights",
       f"vocab {cfg.vocab_size}, width {cfg.width}, {cfg.layers} layers, {cfg.heads} heads ({kv} key/value), "
       f"MLP {cfg.mlp_dim} (SwiGLU), RMSNorm, RoPE, untied head; {sum(p.numel() for p in llama.parameters()):,} "
       f"parameters",
       f"one forward over 2 × {args.seq} tokens: max |logit difference| {diff:.2e}, loss {our_loss:.5f} (ours), "
       f"{their_loss:.5f} (transformers)"],
      watch, "\n".join([
          f"Training step: batch {args.batch} × {args.seq} tokens, next-token cross-entropy + AdamW, median of "
          f"{args.repeats} windows of {args.steps} steps; analytic count (3 × forward_flops): "
          f"{common.fmt(analytic)} GFLOP/step", "", train_table, "",
          f"Greedy generation with a key/value cache: {args.prompt_len}-token prompts, {args.new_tokens} new "
          f"tokens, median of {args.gen_repeats} runs; s/run includes the prefill; compile s is jax-generate's "
          f"first call less a timed one",
          "same tokens as transformers: " + "; ".join(same_tokens(generated, b) for b in gen_batches), "",
          generate_table]),
      notes=[peak_line])


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  common.run(main)

"""benchmarks/llm.py's bookkeeping: transformers' Llama weights land in our DecoderLM (same logits, same loss, same
greedy tokens), and the analytic FLOP count of its generation rows. Nothing here is timed for speed."""
import argparse

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from benchmarks import llm  # noqa: E402

TINY = argparse.Namespace(vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=48, new_tokens=6,
                          gen_repeats=1)


@pytest.fixture(scope="module")
def models():
  cfg = llm.decoder_config(TINY)
  llama = llm.build_llama(cfg, max_len=32)
  return cfg, llama, llm.llama_to_ours(llama, cfg)


def test_copied_weights_give_transformers_logits_and_loss(models):
  _, llama, model = models
  tokens = np.random.default_rng(0).integers(0, TINY.vocab, (2, 12), dtype=np.int32)
  diff, ours, theirs = llm.check_parity(model, llama, tokens)
  assert diff < 1e-4
  assert ours == pytest.approx(theirs, abs=1e-5)


def test_greedy_generation_gives_transformers_tokens(models):
  _, llama, model = models
  prompts = np.random.default_rng(1).integers(0, TINY.vocab, (2, 5), dtype=np.int32)
  prompts[1, 2] = 0  # the pad id inside a prompt is still a prompt token
  results = {("jax-generate", 2): llm.bench_jax_generate(model, prompts, TINY),
             ("transformers-generate", 2): llm.bench_torch_generate(llama, prompts, TINY)}
  assert results[("jax-generate", 2)]["tokens"].shape == (2, TINY.new_tokens)  # no early stop on either side
  assert llm.same_tokens(results, 2) == "batch 2: identical (2/2 rows equal)"


def test_forward_flops_counts_weights_and_causal_attention():
  cfg = llm.decoder_config(TINY)
  # per layer: q, o 32×32; k, v 32×16; gate, up, down 32×48; head 32×64
  weights = 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 48) + 32 * 64
  assert llm.forward_flops(cfg, 3) == 2 * weights * 3 + 4 * 2 * 32 * (1 + 2 + 3)
  assert llm.forward_flops(cfg, 1, past=9) == 2 * weights + 4 * 2 * 32 * 10

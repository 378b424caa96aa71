"""The autoregressive sampler: cached decoding equals recomputing every sequence, greedy equivalences, the sampling
distributions, stop tokens, and one compilation per shape."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_jax.autoregressive import sampler as sampler_lib
from diffusion_jax.autoregressive.sampler import Sampler, SamplingConfig, sample_logits
from diffusion_jax.models.decoder import DecoderConfig, DecoderLM
from tests.test_attention import LLAMA
from tests.test_clip_models import random_model, run

PROMPTS = np.array([[5, 6, 7, 8], [9, 3, 0, 0], [4, 0, 0, 0]])  # right-padded with 0, lengths 4, 2 and 1
GPT = DecoderConfig(vocab_size=40, width=32, layers=2, heads=4, mlp_dim=64, max_len=16)


@pytest.fixture(scope="module", params=["gpt", "llama"])
def sampler(request):
  return Sampler(random_model(lambda: DecoderLM(GPT if request.param == "gpt" else LLAMA, rngs=nnx.Rngs(0))))


def test_cached_decoding_equals_recomputing_each_sequence(sampler):
  steps = 6
  out = sampler(PROMPTS, config=SamplingConfig(max_new_tokens=steps), return_logits=True)
  lengths = (PROMPTS != 0).sum(axis=1)
  # Every step again from scratch: each row's prompt and the tokens generated so far, from position 0, no cache. The
  # sequences sit in one [rows, 10] buffer; what follows a sequence's end cannot reach it (the model is causal).
  model = nnx.merge(sampler.graphdef, sampler.state)
  for step in range(steps):
    sequences = np.full((3, 10), 39)
    for b, n in enumerate(lengths):
      sequences[b, :n + step] = np.concatenate([PROMPTS[b, :n], out.tokens[b, :step]])
    logits = run(model, lambda m, t: m(t), jnp.asarray(sequences))
    last = logits[np.arange(3), lengths + step - 1]
    np.testing.assert_allclose(out.logits[:, step], last, atol=1e-5, err_msg=f"step {step}")
    np.testing.assert_array_equal(out.tokens[:, step], np.argmax(last, axis=-1))
  np.testing.assert_array_equal(out.lengths, steps)


def test_top_k_1_and_a_tiny_top_p_are_greedy(sampler):
  greedy = sampler(PROMPTS, config=SamplingConfig(max_new_tokens=5)).tokens
  for config in (SamplingConfig(max_new_tokens=5, temperature=1.5, top_k=1),
                 SamplingConfig(max_new_tokens=5, temperature=1.5, top_p=1e-6)):
    np.testing.assert_array_equal(sampler(PROMPTS, config=config, rng=jax.random.key(3)).tokens, greedy)


def test_stop_tokens_end_a_row_and_pad_the_rest(sampler):
  free = np.asarray(sampler(PROMPTS, config=SamplingConfig(max_new_tokens=6)).tokens)
  stops = (int(free[0, 2]), int(free[1, 1]))
  out = sampler(PROMPTS, (PROMPTS != 0).sum(axis=1), config=SamplingConfig(max_new_tokens=6, stop_tokens=stops,
                                                                          pad_id=-1))
  for b in range(3):
    hits = [i for i, t in enumerate(free[b]) if t in stops]
    n = hits[0] + 1 if hits else 6
    assert out.lengths[b] == n
    np.testing.assert_array_equal(out.tokens[b, :n], free[b, :n])  # the stop token is kept
    assert (np.asarray(out.tokens[b, n:]) == -1).all()
  assert out.lengths[0] <= 3 and out.lengths[1] <= 2


def test_temperature_draws_follow_the_softmax():
  """4,000 rows of one prompt, one token each: the frequencies match softmax(logits / T) within 0.025, and that bound
  is tight enough to catch a wrong temperature (T or 1/T confused, or ignored)."""
  model = random_model(lambda: DecoderLM(DecoderConfig(vocab_size=6, width=16, layers=1, heads=2, mlp_dim=32,
                                                       max_len=4), rngs=nnx.Rngs(0)), seed=5)
  prompt = np.array([[1, 2, 3]])
  logits = np.asarray(run(model, lambda m, t: m(t), jnp.asarray(prompt))[0, -1], np.float64)
  softmax = lambda z: np.exp(z - z.max()) / np.exp(z - z.max()).sum()
  temperature, bound = 0.5, 0.025
  want = softmax(logits / temperature)
  for wrong in (softmax(logits), softmax(logits * temperature)):
    assert np.abs(wrong - want).max() > 3 * bound  # else this test could not tell
  out = Sampler(model)(np.repeat(prompt, 4000, axis=0), config=SamplingConfig(max_new_tokens=1, temperature=0.5),
                       rng=jax.random.key(0))
  freq = np.bincount(np.asarray(out.tokens[:, 0]), minlength=6) / 4000
  np.testing.assert_allclose(freq, want, atol=bound)


def test_top_k_and_top_p_sample_the_renormalised_head_of_the_distribution():
  logits = jnp.log(jnp.array([[0.05, 0.4, 0.1, 0.3, 0.15]]))
  draws = lambda config: np.asarray(jax.jit(jax.vmap(lambda k: sample_logits(logits, k, config)[0]))(
      jax.random.split(jax.random.key(1), 8000)))
  for config, kept in ((SamplingConfig(1, temperature=1.0, top_k=2), [1, 3]),
                       (SamplingConfig(1, temperature=1.0, top_p=0.75), [1, 3, 4]),  # 0.4 + 0.3 < 0.75
                       (SamplingConfig(1, temperature=1.0, top_k=3, top_p=0.5), [1, 3])):
    want = np.zeros(5)
    want[kept] = np.exp(np.asarray(logits[0]))[kept]
    freq = np.bincount(draws(config), minlength=5) / 8000
    np.testing.assert_allclose(freq, want / want.sum(), atol=0.02)


def test_compiled_once_per_shape_and_deterministic_given_the_rng():
  model = random_model(lambda: DecoderLM(GPT, rngs=nnx.Rngs(0)))
  sampler = Sampler(model)
  config = SamplingConfig(max_new_tokens=4, temperature=1.0)
  compiled_before = sampler_lib._sample._cache_size()
  a = sampler(PROMPTS, config=config, rng=jax.random.key(7)).tokens
  np.testing.assert_array_equal(a, sampler(PROMPTS, config=config, rng=jax.random.key(7)).tokens)
  assert not np.array_equal(a, sampler(PROMPTS, config=config, rng=jax.random.key(8)).tokens)
  sampler(PROMPTS[::-1], config=config, rng=jax.random.key(7))  # other values, same shapes
  Sampler(model)(PROMPTS, config=config, rng=jax.random.key(7))  # a second sampler of the same model
  assert sampler_lib._sample._cache_size() - compiled_before == 1
  with pytest.raises(ValueError, match="every prompt needs 1 to 4 tokens"):
    sampler(np.zeros((1, 4), np.int32), config=config, rng=jax.random.key(0))
  with pytest.raises(ValueError, match="needs an rng"):
    sampler(PROMPTS, config=config)

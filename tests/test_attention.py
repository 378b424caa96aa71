"""The shared attention, transformer block and decoder LM: rotary positions against transformers' Llama, cached
decoding in chunks against whole sequences, grouped-query heads, logical axis names and argument checks."""
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_jax.models.attention import Attention, rope
from diffusion_jax.models.decoder import DecoderConfig, DecoderLM
from diffusion_jax.models.transformer import BlockConfig, TransformerBlock
from diffusion_jax.pretrained.weights import assign, from_torch
from tests.test_clip_models import LOGICAL_AXES, random_model, run

# Llama's shape of block (RMSNorm, SwiGLU, RoPE, 4 query heads sharing 2 key/value heads, no biases, untied head).
LLAMA = DecoderConfig(vocab_size=50, width=32, layers=2, heads=4, kv_heads=2, mlp_dim=48, act="silu", gated_mlp=True,
                      norm="rms", norm_eps=1e-6, positions="rope", rope_theta=500.0, qkv_bias=False, out_bias=False,
                      tie_embeddings=False)


def test_rope_rotates_pairs_so_scores_depend_on_relative_position():
  rng = np.random.default_rng(0)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32) for _ in range(2))
  score = lambda m, n: float(jnp.sum(rope(q, jnp.array([[m]]), 100.0) * rope(k, jnp.array([[n]]), 100.0)))
  np.testing.assert_allclose(rope(q, jnp.zeros((1, 1), jnp.int32), 100.0), q)  # position 0: no rotation
  np.testing.assert_allclose(score(7, 3), score(104, 100), rtol=1e-4)
  assert abs(score(7, 3) - score(3, 7)) > 1e-3  # yet it is not blind to the order
  # Channel i pairs with i + 4 (rotate-half), not with its neighbour: rotating one pair leaves the others alone.
  one_pair = jnp.zeros((1, 1, 1, 8)).at[..., 0].set(1.0)
  rotated = rope(one_pair, jnp.ones((1, 1), jnp.int32), 100.0)[0, 0, 0]
  np.testing.assert_allclose(rotated, [np.cos(1), 0, 0, 0, np.sin(1), 0, 0, 0], atol=1e-6)


def test_decoder_matches_transformers_llama():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg = LLAMA
  ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.layers,
      num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads, rms_norm_eps=cfg.norm_eps,
      rope_theta=cfg.rope_theta, max_position_embeddings=64, tie_word_embeddings=False,
      attn_implementation="eager")).eval()
  torch.manual_seed(0)
  with torch.no_grad():
    for p in ref.parameters():
      p.add_(0.1 * torch.randn_like(p))  # norm scales away from 1
  names = {"embed_tokens.weight": "token_embedding.embedding", "norm.weight": "final_norm.scale",
           "input_layernorm.weight": "attn_norm.scale", "post_attention_layernorm.weight": "mlp_norm.scale",
           "self_attn.q_proj.weight": "attn.query.kernel", "self_attn.k_proj.weight": "attn.key.kernel",
           "self_attn.v_proj.weight": "attn.value.kernel", "self_attn.o_proj.weight": "attn.out.kernel",
           "mlp.gate_proj.weight": "mlp.gate.kernel", "mlp.up_proj.weight": "mlp.fc1.kernel",
           "mlp.down_proj.weight": "mlp.fc2.kernel", "lm_head.weight": "lm_head.kernel"}
  arrays = {}
  for key, value in ref.state_dict().items():
    layer, name = re.fullmatch(r"(?:model\.)?(layers\.\d+\.)?(.+)", key).groups()
    ours = (layer or "") + names[name]
    arrays[ours] = from_torch(value.numpy(), "linear" if ours.endswith("kernel") else "same")
  model = random_model(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
  assign(model, arrays, source="llama")

  tokens = np.array([[3, 17, 9, 42, 5, 1], [8, 8, 30, 2, 11, 49]])
  positions = np.array([[0, 1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12]])  # a row that starts later: rotary offsets
  with torch.no_grad():
    want = ref(torch.from_numpy(tokens), position_ids=torch.from_numpy(positions)).logits.numpy()
  got = run(model, lambda m, t, p: m(t, p), jnp.asarray(tokens), jnp.asarray(positions))
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["learned", "llama"])
def test_decoding_in_chunks_equals_the_whole_sequence(kind):
  """Prefill a padded batch, then continue by 2 and by 1 tokens: every real token's logits are those of one pass
  over its row alone, padding never attended to."""
  cfg = LLAMA if kind == "llama" else DecoderConfig(vocab_size=50, width=32, layers=2, heads=4, mlp_dim=64,
                                                    max_len=16)
  model = random_model(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
  rows = np.array([[3, 17, 9, 42, 5, 1, 7], [8, 30, 2, 11, 0, 0, 0]])
  lengths = np.array([4, 1])  # prompt lengths; each row's next 3 tokens come in chunks of 2 and 1
  prompts = np.where(np.arange(4) < lengths[:, None], rows[:, :4], 0)
  after = np.stack([row[n:n + 3] for row, n in zip(rows, lengths)])

  def chunked(m):
    cache = m.init_cache(2, 7)
    positions = jnp.broadcast_to(jnp.arange(4), (2, 4))
    prefill, cache = m.decode(jnp.asarray(prompts), positions, cache, valid=positions < lengths[:, None])
    two, cache = m.decode(jnp.asarray(after[:, :2]), jnp.asarray(lengths[:, None] + np.arange(2)), cache)
    one, _ = m.decode(jnp.asarray(after[:, 2:]), jnp.asarray(lengths[:, None] + 2), cache)
    return prefill, jnp.concatenate([two, one], axis=1)

  prefill, continued = run(model, chunked)
  for b, n in enumerate(lengths):
    whole = run(model, lambda m, t: m(t), jnp.asarray(rows[b:b + 1, :n + 3]))[0]
    np.testing.assert_allclose(prefill[b, :n], whole[:n], atol=1e-5)
    np.testing.assert_allclose(continued[b], whole[n:], atol=1e-5)


def test_block_decode_with_cross_attention_equals_the_whole_sequence():
  cfg = BlockConfig(width=16, heads=2, mlp_dim=32, cross_attention_dim=12)
  block = random_model(lambda: TransformerBlock(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
  context = jnp.asarray(rng.normal(size=(2, 3, 12)), jnp.float32)

  def both(b, x, context):
    cache = b.attn.init_cache(2, 5)
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    head, cache = b.decode(x[:, :3], cache, positions=pos[:, :3], context=context)
    tail, _ = b.decode(x[:, 3:], cache, positions=pos[:, 3:], context=context)
    return jnp.concatenate([head, tail], axis=1), b(x, context, is_causal=True)

  chunks, whole = run(block, both, x, context)
  np.testing.assert_allclose(chunks, whole, atol=1e-5)
  with pytest.raises(ValueError, match="pass a context"):
    block(x)


def test_grouped_query_attention_equals_repeated_key_value_heads():
  gqa = random_model(lambda: Attention(16, heads=4, kv_heads=2, rngs=nnx.Rngs(0)))
  mha = random_model(lambda: Attention(16, heads=4, rngs=nnx.Rngs(0)))
  for name in ("query", "out"):
    setattr(mha, name, getattr(gqa, name))
  for name in ("key", "value"):  # each key/value head serves two consecutive query heads
    kernel = getattr(gqa, name).kernel[...].reshape(16, 2, 1, 4)
    getattr(mha, name).kernel[...] = jnp.broadcast_to(kernel, (16, 2, 2, 4)).reshape(16, 16)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, 16)), jnp.float32)
  np.testing.assert_allclose(gqa(x, is_causal=True), mha(x, is_causal=True), atol=1e-5)


def test_every_decoder_parameter_has_logical_axis_names():
  for cfg in (LLAMA, DecoderConfig(vocab_size=20, width=16, layers=1, heads=2, mlp_dim=32)):
    for path, var in nnx.state(nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0))), nnx.Param).flat_state():
      axes = var.get_metadata().get("out_sharding")
      assert axes is not None and len(axes) == len(var.value.shape) and set(axes) <= LOGICAL_AXES, (path, axes)


def test_configuration_errors_name_the_problem():
  with pytest.raises(ValueError, match="not a multiple of kv_heads"):
    nnx.eval_shape(lambda: Attention(16, heads=4, kv_heads=3, rngs=nnx.Rngs(0)))
  rotary = nnx.eval_shape(lambda: Attention(16, heads=2, rope_theta=1e4, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="self-attention"):
    rotary(jnp.ones((1, 2, 16)), jnp.ones((1, 3, 16)))
  with pytest.raises(ValueError, match="norm 'batch'"):
    BlockConfig(width=16, heads=2, mlp_dim=32, norm="batch")
  with pytest.raises(ValueError, match="positions"):
    DecoderConfig(positions="sinusoidal")
  model = nnx.eval_shape(lambda: DecoderLM(DecoderConfig(max_len=8, width=16, heads=2, layers=1), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="the 8 this model learned"):
    model.init_cache(1, 9)


@pytest.mark.parametrize("kv_heads,causal,masked,loop", [(4, False, False, False), (2, True, False, False),
                                                         (1, False, True, False), (2, True, True, True)])
def test_host_attention_equals_jax_attention_with_its_gradients(monkeypatch, kv_heads, causal, masked, loop):
  import jax
  from diffusion_jax.models import attention
  if loop:  # scores of a few hundred bytes per (batch, head) pair go through the loop, 1 to 3 pairs at a time
    monkeypatch.setattr(attention, "HOST_LOOP_BYTES", 64)
    monkeypatch.setattr(attention, "HOST_SCORE_BYTES", 1000)
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.normal(size=(3, 6, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(3, 9, kv_heads, 8)), jnp.float32) for _ in range(2))
  mask = None
  if masked:
    mask = jnp.asarray(rng.random((3, 1, 6, 9)) < 0.7).at[0, 0, 1].set(False)  # one query sees nothing
  ours = lambda q, k, v: attention.host_attention(q, k, v, mask, causal)
  theirs = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="xla")
  np.testing.assert_allclose(ours(q, k, v), theirs(q, k, v), atol=2e-6)
  grad = lambda f: jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(grad(ours), grad(theirs)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_attention_layers_use_the_host_kernel_on_cpu_unless_told_otherwise(monkeypatch):
  from diffusion_jax.models import attention
  calls = []
  monkeypatch.setattr(attention, "host_attention", lambda *a: calls.append(a) or a[0])
  x = jnp.ones((1, 3, 16))
  attention.Attention(16, heads=2, rngs=nnx.Rngs(0))(x)
  assert len(calls) == 1
  attention.Attention(16, heads=2, rngs=nnx.Rngs(0), implementation="xla")(x)
  assert len(calls) == 1

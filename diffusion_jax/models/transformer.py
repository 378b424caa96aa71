"""The pre-norm transformer block of the ViT, the CLIP towers, the diffusion text encoder and the decoder LM.

x + attn(norm(x)), optionally x + cross_attn(norm(x), context), then x + mlp(norm(x)); causal or not per call, with
a key/value cache for decoding (`decode`). Its options cover the families the library loads or trains: CLIP/SigLIP
(LayerNorm, quick_gelu/gelu/gelu_tanh, biases everywhere) and Llama/Qwen2 (RMSNorm, gated SiLU MLP, RoPE,
grouped-query heads, no or query/key/value-only biases). The U-Net's and DiT's blocks keep their own structure
(GEGLU feed-forward, adaLN) and use the same `Attention`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
from flax import nnx

from diffusion_jax.models import layers
from diffusion_jax.models.attention import Attention, KVCache

Dtype = Any


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI's sigmoid approximation of GELU; their CLIP weights were trained with it, so loading them needs it."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # erf GELU, PyTorch's nn.GELU()
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # SigLIP's gelu_pytorch_tanh
    "silu": jax.nn.silu,  # with gated_mlp: SwiGLU (Llama, Qwen2)
}
NORMS = ("layer", "rms")
# 'lecun': flax's default for every kernel. 'clip': open_clip's init of CLIP's text tower (std width^-0.5 into
# attention, (2·width)^-0.5 into the MLP, residual outputs shrunk by (2·depth)^-0.5 so that deep stacks start near
# the identity); we use it for both CLIP towers because PyTorch's default uniform init, which open_clip leaves on the
# image tower, is scale-unaware.
INITS = ("lecun", "clip")


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """One block's shape and options. mlp_dim is the hidden width of the MLP (of each branch when gated)."""
  width: int
  heads: int
  mlp_dim: int
  act: str = "gelu"
  gated_mlp: bool = False  # act(gate(x)) · fc1(x): SwiGLU with act='silu', GEGLU with act='gelu'
  norm: str = "layer"
  eps: float = 1e-5
  kv_heads: Optional[int] = None  # grouped-query attention; None: one key/value head per query head
  head_dim: Optional[int] = None  # None: width // heads
  qkv_bias: bool = True
  out_bias: bool = True  # the attention output and the MLP projections (Qwen2: qkv_bias only; Llama: neither)
  rope_theta: Optional[float] = None  # rotary positions in self-attention; None: none
  cross_attention_dim: Optional[int] = None  # width of the context of a cross-attention layer; None: none
  init: str = "lecun"
  depth: int = 1  # blocks in the stack; the 'clip' init scales residual outputs by it
  dtype: Dtype = None  # compute dtype; parameters stay float32
  attention_impl: Optional[str] = None  # None (attention.attend picks), 'host', 'xla' or 'cudnn'

  def __post_init__(self):
    if self.head_dim is None and self.width % self.heads:
      raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
    for field, value, known in (("act", self.act, ACTIVATIONS), ("norm", self.norm, NORMS),
                                ("init", self.init, INITS)):
      if value not in known:
        raise ValueError(f"block {field} {value!r} is not one of {sorted(known)}")


def _inits(cfg: BlockConfig) -> tuple[Callable, Callable, Callable, Callable]:
  """Kernel initialisers of (q/k/v, attention output, MLP input, MLP output)."""
  if cfg.init == "lecun":
    return (nnx.initializers.lecun_normal(),) * 4
  normal = nnx.initializers.normal
  residual = normal(cfg.width ** -0.5 * (2 * cfg.depth) ** -0.5)
  return normal(cfg.width ** -0.5), residual, normal((2 * cfg.width) ** -0.5), residual


def norm(cfg: BlockConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  make = layers.layer_norm if cfg.norm == "layer" else layers.rms_norm
  return make(cfg.width, epsilon=cfg.eps, rngs=rngs, dtype=cfg.dtype)


class MLP(nnx.Module):
  """fc2(act(fc1(x))), or with a gate fc2(act(gate(x)) · fc1(x))."""

  def __init__(self, width: int, mlp_dim: int, act: str, *, in_init: Callable, out_init: Callable, rngs: nnx.Rngs,
               gated: bool = False, bias: bool = True, dtype: Dtype = None):
    self.act = act

    def proj(d_in, d_out, axes, init):
      return layers.dense(d_in, d_out, axes, use_bias=bias, kernel_init=init, rngs=rngs, dtype=dtype)

    self.fc1 = proj(width, mlp_dim, ("embed", "mlp"), in_init)
    self.gate = proj(width, mlp_dim, ("embed", "mlp"), in_init) if gated else None
    self.fc2 = proj(mlp_dim, width, ("mlp", "embed"), out_init)

  def __call__(self, x: jax.Array) -> jax.Array:
    act = ACTIVATIONS[self.act]
    h = act(self.fc1(x)) if self.gate is None else act(self.gate(x)) * self.fc1(x)
    return self.fc2(h)


class TransformerBlock(nnx.Module):
  """The pre-norm block; `block(x, ...)` for whole sequences, `block.decode(x, cache, ...)` for cached decoding."""

  def __init__(self, cfg: BlockConfig, *, rngs: nnx.Rngs):
    qkv_init, attn_out_init, mlp_in_init, mlp_out_init = _inits(cfg)

    def attention(context_dim, rope_theta):
      return Attention(cfg.width, heads=cfg.heads, kv_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                       context_dim=context_dim, qkv_bias=cfg.qkv_bias, out_bias=cfg.out_bias, kernel_init=qkv_init,
                       out_kernel_init=attn_out_init, rope_theta=rope_theta, rngs=rngs, dtype=cfg.dtype,
                       implementation=cfg.attention_impl)

    self.attn_norm = norm(cfg, rngs=rngs)
    self.attn = attention(None, cfg.rope_theta)
    if cfg.cross_attention_dim:
      self.cross_norm = norm(cfg, rngs=rngs)
      self.cross_attn = attention(cfg.cross_attention_dim, None)
    else:
      self.cross_norm = self.cross_attn = None
    self.mlp_norm = norm(cfg, rngs=rngs)
    self.mlp = MLP(cfg.width, cfg.mlp_dim, cfg.act, in_init=mlp_in_init, out_init=mlp_out_init, rngs=rngs,
                   gated=cfg.gated_mlp, bias=cfg.out_bias, dtype=cfg.dtype)

  def __call__(self, x: jax.Array, context: Optional[jax.Array] = None, positions: Optional[jax.Array] = None,
               mask: Optional[jax.Array] = None, drop_rng: Optional[jax.Array] = None, *, is_causal: bool = False,
               drop_path: float = 0.0) -> jax.Array:
    """x [B, T, width]; context [B, S, cross_attention_dim] for a block with cross-attention; positions [B, T]
    for RoPE; mask broadcastable to [B, heads, T, T]. Arrays are positional so `remat.apply` can trace them.
    With `drop_rng` and `drop_path` > 0 each residual branch is dropped per example (stochastic depth)."""
    keep_attn, keep_mlp = residual_keep(drop_rng, drop_path, x)
    x = x + keep_attn * self.attn(self.attn_norm(x), positions=positions, mask=mask, is_causal=is_causal)
    return self._cross_and_mlp(x, context, keep_mlp)

  def decode(self, x: jax.Array, cache: KVCache, *, positions: jax.Array, valid: Optional[jax.Array] = None,
             context: Optional[jax.Array] = None) -> tuple[jax.Array, KVCache]:
    """`__call__` for T new tokens of causal sequences whose earlier keys/values are in `cache` (see
    `Attention.decode`); returns the new states and the updated cache."""
    h, cache = self.attn.decode(self.attn_norm(x), cache, positions=positions, valid=valid)
    return self._cross_and_mlp(x + h, context), cache

  def _cross_and_mlp(self, x: jax.Array, context: Optional[jax.Array], keep_mlp: Any = 1.0) -> jax.Array:
    if self.cross_attn is not None:
      if context is None:
        raise ValueError("this block has cross-attention; pass a context")
      x = x + self.cross_attn(self.cross_norm(x), context)
    return x + keep_mlp * self.mlp(self.mlp_norm(x))


def residual_keep(rng: Optional[jax.Array], rate: float, x: jax.Array) -> tuple[Any, Any]:
  """Stochastic depth (timm's DropPath): per example, the attention and MLP branches are each dropped with
  probability `rate` and kept ones scaled by 1/(1 - rate), so the expected output is unchanged; (1, 1) without an
  rng or at rate 0 (evaluation)."""
  if rng is None or not rate:
    return 1.0, 1.0
  if not 0.0 < rate < 1.0:
    raise ValueError(f"drop_path must be in [0, 1), got {rate}")
  keep = jax.random.bernoulli(rng, 1.0 - rate, (2, x.shape[0], 1, 1)).astype(x.dtype) / (1.0 - rate)
  return keep[0], keep[1]


__all__ = ["ACTIVATIONS", "BlockConfig", "MLP", "TransformerBlock", "norm", "quick_gelu", "residual_keep"]

"""unCLIP's autoregressive prior (DALL-E 2, section 2.1): caption → CLIP image embedding as a token sequence.

The image embedding is written as `ar_prior.components` code tokens: its principal-component coefficients, each cut
into `ar_prior.bins` equal-mass buckets (`autoregressive.embedding_codes`). PCA and buckets are fitted once, when
training starts, on the first `unclip.stats_examples` training images' embeddings, and recorded with the CLIP run
they came from in WORKDIR/image_embedding_pca.json (mean, components, bucket edges and centres, explained variance
and the round trip's cosine to the embeddings it was fitted on: a ceiling on what the prior can reach).

A decoder-only transformer (`models.ar_prior.ARPrior`, the shared `DecoderLM`) reads the caption's tokens, its CLIP
text embedding (as `ar_prior.text_prefix` input embeddings) and a separator, then predicts the codes with
cross-entropy on the codes only. For `ar_prior.cond_drop_prob` of the rows the caption is replaced by the empty one
(tokens and text embedding), which sampling uses for classifier-free guidance on the logits (`unclip.guidance_scale`).
Sampling goes through the shared KV-cache sampler at `ar_prior.temperature`; codes decode to bucket centres and
through the inverse PCA to an embedding; of `unclip.candidates` draws per caption the one closest to the caption's
text embedding is kept. Everything else — towers, health check, the decoder's chain — is `unclip_prior`'s.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from diffusion_jax.autoregressive.embedding_codes import EmbeddingCodes
from diffusion_jax.config import ConfigError, compute_dtype
from diffusion_jax.models.ar_prior import ARPrior, ARPriorConfig
from diffusion_jax.models.clip import CLIPModel
from diffusion_jax.models.decoder import DecoderConfig
from diffusion_jax.tasks.unclip_prior import CLIPPriorTask, PriorModel, keep_closest
from diffusion_jax.train.task import register

PCA_FILE = "image_embedding_pca.json"


@register("unclip_ar_prior")
class UnCLIPARPriorTask(CLIPPriorTask):
  record_file = PCA_FILE

  def __init__(self, config):
    super().__init__(config)
    a, m = config.ar_prior, config.model
    dim = self.clip_config.embed_dim
    if not 1 <= a.components <= min(dim, config.unclip.stats_examples):
      raise ConfigError(f"ar_prior.components={a.components} must be between 1 and the CLIP embedding width {dim} "
                        f"(and at most unclip.stats_examples)")
    if a.bins < 2 or a.text_prefix < 1 or not 0 <= a.cond_drop_prob < 1 or a.temperature < 0:
      raise ConfigError("need ar_prior.bins >= 2, ar_prior.text_prefix >= 1, 0 <= ar_prior.cond_drop_prob < 1 and "
                        "ar_prior.temperature >= 0")
    lm = DecoderConfig(width=m.width, layers=m.layers, heads=m.heads, mlp_dim=m.mlp_dim, act="gelu", norm="layer",
                       positions="learned", dtype=compute_dtype(m.compute_dtype),
                       attention_impl=m.attention_impl or None)
    self.prior_config = ARPriorConfig.for_codes(
        lm, text_vocab=self.tokenizer.vocab_size, text_len=int(config.data.max_text_len), embed_dim=dim,
        text_prefix=int(a.text_prefix), components=int(a.components), bins=int(a.bins))
    self.codes: EmbeddingCodes | None = None  # set by `prepare`

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    return PriorModel(CLIPModel(self.clip_config, rngs=rngs), ARPrior(self.prior_config, rngs=rngs))

  # ------------------------------------------------------------------ PCA and buckets
  def fit(self, embeddings: np.ndarray) -> dict:
    a = self.config.ar_prior
    codes = EmbeddingCodes.fit(embeddings, int(a.components), int(a.bins))
    back = np.asarray(codes.decode(codes.encode(embeddings)), np.float64)
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
    record = dict(codes.to_record(), reconstruction_cosine=float(np.mean(np.sum(unit(back) * unit(embeddings), -1))))
    logging.info("PCA to %d components explains %.3f of the variance; codes → embedding cosine %.3f",
                 codes.num_components, record["explained_variance"], record["reconstruction_cosine"])
    return record

  def use_record(self, record: dict) -> None:
    self.codes = EmbeddingCodes.from_record(record)

  # ------------------------------------------------------------------ training
  def loss(self, model, batch, rng):
    codes = self.codes.encode(self.embed_images(model, batch["image"]))
    drop = jax.random.bernoulli(rng, self.config.ar_prior.cond_drop_prob, codes.shape[:1])
    tokens = jnp.where(drop[:, None], jnp.asarray(self.null_tokens)[None], batch["tokens"])
    logits = model.prior(tokens, self.condition(model, tokens)["embeds"], codes)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), codes[..., None], axis=-1)[..., 0]
    weight = batch["valid"]
    count = jnp.maximum(jnp.sum(weight), 1.0)
    correct = jnp.mean((jnp.argmax(logits, -1) == codes).astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.mean(nll, -1) * weight) / count, {
        "code_accuracy": jnp.sum(correct * weight) / count,
        "count/skipped_examples": jnp.sum(1.0 - weight)}

  # ------------------------------------------------------------------ the decoder's interface
  def prior_module(self, rngs: nnx.Rngs) -> nnx.Module:
    return ARPrior(self.prior_config, rngs=rngs)

  def prior_select(self) -> tuple[str, ...]:
    return ("prior",)  # all of it trains

  def chain_embeddings(self, prior, text_tower, tokens: jax.Array, rng: jax.Array, u) -> jax.Array:
    k = int(u.candidates)
    text = text_tower.encode_text(tokens).astype(jnp.float32)
    null_tokens = jnp.asarray(self.null_tokens)[None]
    rep = lambda x: jnp.repeat(x, k, axis=0)
    out = prior.sample(rep(tokens), rep(text), null_tokens, text_tower.encode_text(null_tokens), rng,
                       guidance_scale=float(u.guidance_scale), temperature=float(self.config.ar_prior.temperature))
    emb = self.codes.decode(out.tokens)
    return keep_closest(emb.reshape(tokens.shape[0], k, emb.shape[-1]), text)

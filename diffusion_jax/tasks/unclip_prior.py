"""unCLIP's diffusion prior (DALL-E 2, section 2.1): caption → CLIP image embedding, on the trainer.

A `PriorTransformer` (diffusers' architecture, `models.prior`) sees [caption token states, CLIP text embedding,
time step, noised image embedding, a learned query] under a causal mask and predicts the clean image embedding
(x_0). Both CLIP towers come frozen from a finished contrastive run (`text.clip_workdir`): the text tower gives the
condition, the image tower the target. Classifier-free guidance is learned by replacing the caption of a fraction
(`diffusion.cond_drop_prob`) of the rows by the empty caption, which is what guided sampling uses as the
unconditional half (diffusers' UnCLIPPipeline does the same).

The prior works on image embeddings normalised by the training set's per-dimension mean and std, as Karlo's prior
does (its `clip_mean`/`clip_std`). They are estimated once from the first `unclip.stats_examples` training images
and recorded in WORKDIR/image_embedding_stats.json with the CLIP run they came from; every later start, evaluation
and the decoder's text → image chain read that file.

Sampling (`sample_embeddings`) follows the paper: a guided DDIM/DDPM chain in the normalised space, then, of
`unclip.candidates` draws per caption, the one whose embedding is most similar to the caption's CLIP text embedding.

`CLIPPriorTask` is what every prior shares — the frozen towers, the record fitted once on the first training images'
embeddings, the held-out health check, sampling prompts, and the interface a decoder's chain uses — so that another
prior (`tasks.unclip_ar_prior`, the paper's autoregressive one) writes only its model, record, loss and sampler.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from diffusion_jax.config import ConfigError, compute_dtype
from diffusion_jax.contrastive import zero_shot
from diffusion_jax.data import latent_cache, pipeline, tokenizers
from diffusion_jax.diffusion import objectives, samplers
from diffusion_jax.diffusion.schedules import NoiseSchedule
from diffusion_jax.models.clip import CLIPModel
from diffusion_jax.models.prior import PriorConfig, PriorTransformer
from diffusion_jax.parallel import host
from diffusion_jax.tasks import clip_towers
from diffusion_jax.tasks.latent import identity
from diffusion_jax.train import parts
from diffusion_jax.train.evaluators import split_outputs
from diffusion_jax.train.task import ModelContext, Task, register

STATS_FILE = "image_embedding_stats.json"
# The prior's own normalisation parameters: kept at their init here (the task normalises with the recorded
# statistics), so they are frozen and never part of what a decoder restores from a prior run.
PRIOR_STATS = ("clip_mean", "clip_std")


class PriorModel(nnx.Module):
  """The frozen CLIP model (both towers) and the trained prior."""

  def __init__(self, clip: CLIPModel, prior: PriorTransformer):
    self.clip = clip
    self.prior = prior


def text_condition(clip_text, tokens: jax.Array, pad_id: int) -> dict:
  """What the prior is conditioned on: token states [B, L, W], projected text embedding [B, D], token mask [B, L].

  `clip_text` has the `text_model` and `text_projection` of a CLIP model (CLIPModel or
  CLIPTextModelWithProjection).
  """
  states, pooled = clip_text.text_model.encode(tokens)
  return {"states": states, "embeds": clip_text.text_projection(pooled), "mask": tokens != pad_id}


def prior_config(config, clip_cfg) -> PriorConfig:
  m, width = config.model, clip_cfg.text.width
  if width != clip_cfg.embed_dim:
    # diffusers' PriorTransformer projects token states with a layer sized by the embedding width.
    raise ConfigError(f"the prior takes token states as wide as the CLIP embedding; the CLIP run's text width is "
                      f"{width} and its embed_dim {clip_cfg.embed_dim}")
  return PriorConfig(num_attention_heads=m.num_heads, attention_head_dim=m.head_dim, num_layers=m.layers,
                     embedding_dim=clip_cfg.embed_dim, num_embeddings=config.data.max_text_len,
                     dtype=compute_dtype(m.compute_dtype), attention_impl=m.attention_impl or None)


def trained_names(prior_cfg: PriorConfig) -> tuple[str, ...]:
  """Names of the prior's trained submodules (everything but its normalisation), as a `RunSource` select."""
  abstract = nnx.eval_shape(lambda: PriorTransformer(prior_cfg, rngs=nnx.Rngs(0)))
  names = {parts.dotted(path).split(".")[0] for path, _ in nnx.state(abstract, nnx.Param).flat_state()}
  return tuple(f"prior.{n}" for n in sorted(names - set(PRIOR_STATS)))


# ---------------------------------------------------------------------------------------------------- statistics
def read_record(workdir: str, name: str) -> dict:
  """The JSON record `name` a prior run wrote in `workdir` when it started training."""
  path = os.path.join(workdir, name)
  if not os.path.exists(path):
    raise ConfigError(f"{path} does not exist: the prior run writes it when it starts training")
  with open(path) as f:
    return json.load(f)


def read_stats(workdir: str) -> dict:
  record = read_record(workdir, STATS_FILE)
  record["mean"] = np.asarray(record["mean"], np.float32)
  record["std"] = np.asarray(record["std"], np.float32)
  return record


def normalize(x, stats):
  return (x - stats["mean"]) / stats["std"]


def denormalize(x, stats):
  return x * stats["std"] + stats["mean"]


# ---------------------------------------------------------------------------------------------------- sampling
def sample_embeddings(prior: PriorTransformer, cond: Mapping[str, jax.Array], uncond: Mapping[str, jax.Array],
                      rng: jax.Array, *, stats: Mapping[str, np.ndarray], schedule: NoiseSchedule, sampler: str,
                      num_steps: int, guidance_scale: float, candidates: int) -> jax.Array:
  """Image embeddings [B, D] (denormalised) for the captions of `cond` (`text_condition` of B rows).

  `uncond` is the empty caption's condition (one row). Each caption gets `candidates` guided draws; the one most
  similar (cosine) to the caption's text embedding is kept. Traceable: the whole chain is one `lax.scan`.
  """
  b = cond["embeds"].shape[0]
  k = int(candidates)
  rep = lambda x: jnp.repeat(x, k, axis=0)
  cond_k = jax.tree.map(rep, dict(cond))
  n = b * k
  both = jax.tree.map(lambda c, u: jnp.concatenate([c, jnp.broadcast_to(u, (n, *u.shape[1:])).astype(c.dtype)]),
                      cond_k, dict(uncond))

  def batched(x, t):
    return prior(x, t, proj_embedding=both["embeds"], encoder_hidden_states=both["states"],
                 attention_mask=both["mask"]).astype(jnp.float32)

  model_fn = samplers.classifier_free_guidance(batched, guidance_scale)
  rng_noise, rng_chain = jax.random.split(rng)
  dim = cond["embeds"].shape[-1]
  x = samplers.sample(model_fn, schedule, jax.random.normal(rng_noise, (n, dim), jnp.float32), rng_chain,
                      sampler=sampler, num_steps=num_steps, prediction_type="sample", clip_x0=False)
  return keep_closest(denormalize(x, stats).reshape(b, k, dim), cond["embeds"])


def keep_closest(candidates: jax.Array, text_embeds: jax.Array) -> jax.Array:
  """Of `candidates` [B, K, D], each caption's draw most similar (cosine) to its text embedding [B, D]: [B, D]."""
  unit = lambda v: v / jnp.linalg.norm(v, axis=-1, keepdims=True)
  score = jnp.einsum("bkd,bd->bk", unit(candidates), unit(text_embeds.astype(jnp.float32)))
  return jnp.take_along_axis(candidates, jnp.argmax(score, axis=1)[:, None, None], axis=1)[:, 0]


class CLIPPriorTask(Task):
  """An unCLIP prior (caption → CLIP image embedding) on the frozen towers of `text.clip_workdir`.

  A subclass names its `record_file`, fits it (`fit`) and takes it in (`use_record`), builds `PriorModel(clip,
  prior)`, writes its loss and the interface a decoder's text → image chain uses: `prior_module`, `prior_select`,
  `chain_embeddings` (the record is read back by `load_stats`). Health evaluation and sampling come from here.
  """
  record_file = ""  # the JSON record `prepare` fits once and keeps in the workdir

  def __init__(self, config):
    super().__init__(config)
    u = config.unclip
    self.clip_source = clip_towers.run_source("text.clip_workdir", config.text.clip_workdir, ("text", "image"),
                                              target="clip", data=config.data)
    self.clip_config = self.clip_source.task().model_config
    self.tokenizer = tokenizers.get_tokenizer(config.data.tokenizer)
    self.null_tokens = np.asarray(self.tokenizer([""], config.data.max_text_len)[0], np.int32)
    if u.candidates < 1 or u.stats_examples < 2:
      raise ConfigError("unclip.candidates must be >= 1 and unclip.stats_examples >= 2")

  # ------------------------------------------------------------------ the frozen towers
  def frozen(self):
    return parts.under("clip")

  def weight_sources(self):
    return [self.clip_source]

  def embed_images(self, model: PriorModel, images: jax.Array) -> jax.Array:
    return model.clip.encode_image(clip_towers.pixels(self.clip_source, images)).astype(jnp.float32)

  def condition(self, model: PriorModel, tokens: jax.Array) -> dict:
    return text_condition(model.clip, tokens, self.tokenizer.pad_id)

  # ------------------------------------------------------------------ the record fitted on the training embeddings
  def fit(self, embeddings: np.ndarray) -> dict:
    """The record (JSON-able values) of the first `unclip.stats_examples` training embeddings [N, D] (float64)."""
    raise NotImplementedError

  def use_record(self, record: dict) -> None:
    """Takes in a record `fit` made (as read back from JSON)."""
    raise NotImplementedError

  def load_stats(self, workdir: str) -> None:
    """The record of the prior run in `workdir` (for a decoder that restores that prior)."""
    self.use_record(read_record(workdir, self.record_file))

  def prepare(self, ctx: ModelContext, *, training: bool) -> None:
    path = os.path.join(ctx.workdir, self.record_file)
    if os.path.exists(path):
      record = read_record(ctx.workdir, self.record_file)
      if record["clip"] != identity(self.clip_source):
        raise ConfigError(f"{path} was fitted on another CLIP run ({record['clip']['path']}); use a new workdir")
    elif not training:
      raise ConfigError(f"{path} does not exist: train this prior first")
    else:
      emb = self._first_embeddings(ctx)
      record = dict(self.fit(emb), examples=int(len(emb)), clip=identity(self.clip_source))
      record = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in record.items()}  # as JSON holds it
      if jax.process_index() == 0:
        latent_cache.write_json(path, record)
    self.use_record(record)

  def _first_embeddings(self, ctx: ModelContext) -> np.ndarray:
    d, u = self.config.data, self.config.unclip
    batch_size = min(256, int(u.stats_examples))
    ds = pipeline.make_dataset(d, d.train_split, global_batch_size=batch_size, seed=int(self.config.seed),
                               shuffle=False, repeat=False, drop_remainder=False)
    embed = ctx.jit(self.embed_images)
    rows = []
    for batch in ds:
      emb = host.gather(embed(np.asarray(batch["image"])))
      rows.append(np.asarray(emb)[np.asarray(batch["valid"]) > 0])
      if sum(len(r) for r in rows) >= u.stats_examples:
        break
    emb = np.concatenate(rows)[: int(u.stats_examples)].astype(np.float64)
    logging.info("%s from the image embeddings of %d training images", self.record_file, len(emb))
    return emb

  # ------------------------------------------------------------------ what a decoder's chain takes from a prior run
  # (the interface every prior task offers: `tasks.unclip_decoder` restores the module frozen and samples it)
  def prior_module(self, rngs: nnx.Rngs) -> nnx.Module:
    raise NotImplementedError

  def prior_select(self) -> tuple[str, ...]:
    """What a decoder restores from this run: the prior's trained parameters (names under `prior.`)."""
    raise NotImplementedError

  def chain_embeddings(self, prior, text_tower, tokens: jax.Array, rng: jax.Array, u) -> jax.Array:
    """Image embeddings [B, D] for caption `tokens`, sampled with `prior` (restored frozen in a decoder) under the
    frozen `text_tower` (a CLIPTextModelWithProjection) and the sampling settings of `u` (a config's `unclip`);
    traceable."""
    raise NotImplementedError

  # ------------------------------------------------------------------ sampling and health
  def _sample_fn(self, model, tokens, rng):
    return self.chain_embeddings(model.prior, model.clip, tokens, rng, self.config.unclip)

  def prompt_embeddings(self, ctx: ModelContext, prompts, seed: int) -> np.ndarray:
    """Sampled image embeddings [N, D] for `prompts`, in fixed-size chunks (one compiled program)."""
    tokens = np.asarray(self.tokenizer(list(prompts), self.config.data.max_text_len), np.int32)
    chunk = min(int(self.config.train.batch_size), len(prompts))
    fn = ctx.jit(self._sample_fn)
    return host.run_chunked(lambda t, rng: fn(t, rng), tokens, chunk,
                            extra=lambda i: (jax.random.fold_in(jax.random.key(seed), i),))

  def _truth(self, model, batch):
    c = self.condition(model, batch["tokens"])
    return {"image": self.embed_images(model, batch["image"]), "text": c["embeds"].astype(jnp.float32),
            "label": batch["label"]}

  def health(self, ctx: ModelContext, split: str, batch_size: int, max_examples: int, seed: int) -> dict[str, Any]:
    """The design documents' prior check on held-out pairs: how close the sampled image embedding comes to the
    true one (cosine), against the caption's own text–image cosine and against the prior's embedding for an
    unrelated caption (another row's, of a different digit where labels say so); and the share of sampled
    embeddings whose nearest class prompt (CLIP zero-shot) is the caption's digit."""
    out = split_outputs(ctx, self.config.data, split, batch_size, ctx.jit(self._truth), max_examples=max_examples)
    labels = out["label"]
    prompts = pipeline.prompts_for_labels(self.config.data, labels)
    order = _unrelated(labels, seed)
    predicted = self.prompt_embeddings(ctx, prompts, seed)
    true, text, pred = (zero_shot.normalize(v) for v in (out["image"], out["text"], predicted))
    result = {"prior_cosine": float(np.mean(np.sum(pred * true, -1))),
              "text_image_cosine": float(np.mean(np.sum(text * true, -1))),
              "unrelated_cosine": float(np.mean(np.sum(pred[order] * true, -1)))}
    names = self.config.data.class_names
    if len(names):
      classes = np.arange(len(names))
      class_tokens = np.asarray(self.tokenizer(pipeline.prompts_for_labels(self.config.data, classes),
                                               self.config.data.max_text_len), np.int32)
      class_text = zero_shot.normalize(host.gather(ctx.jit(
          lambda m, t: self.condition(m, t)["embeds"].astype(jnp.float32))(class_tokens)))
      result["prior_zero_shot"] = float(np.mean(np.argmax(pred @ class_text.T, -1) == labels))
      result["image_zero_shot"] = float(np.mean(np.argmax(true @ class_text.T, -1) == labels))
    return result

  def sample(self, ctx: ModelContext, out_dir: str) -> dict[str, Any]:
    """Sampled embeddings of the per-class prompts, as embeddings.npy with index.jsonl (a prior draws no image)."""
    s = self.config.sample
    labels = np.repeat(np.arange(len(self.config.data.class_names)), int(s.per_prompt))
    prompts = list(s.prompts) or pipeline.prompts_for_labels(self.config.data, labels)
    emb = self.prompt_embeddings(ctx, prompts, int(s.seed))
    if not ctx.is_main_process:
      return {}
    os.makedirs(out_dir, exist_ok=True)
    np.save(os.path.join(out_dir, "embeddings.npy"), emb)
    with open(os.path.join(out_dir, "index.jsonl"), "w") as f:
      for i, p in enumerate(prompts):
        f.write(json.dumps({"index": i, "prompt": p}) + "\n")
    return {"embeddings": os.path.join(out_dir, "embeddings.npy")}


@register("unclip_prior")
class UnCLIPPriorTask(CLIPPriorTask):
  record_file = STATS_FILE

  def __init__(self, config):
    super().__init__(config)
    u, d = config.unclip, config.diffusion
    self.prior_config = prior_config(config, self.clip_config)
    self.schedule = NoiseSchedule.create(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)
    if u.sampler not in samplers.SAMPLERS or "sample" not in samplers.SAMPLERS[u.sampler].prediction_types:
      raise ConfigError(f"unclip.sampler={u.sampler!r} cannot sample an x_0-predicting prior; use 'ddim' or 'ddpm'")
    self.stats: Optional[dict] = None  # set by `prepare`

  # ------------------------------------------------------------------ the model
  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    return PriorModel(CLIPModel(self.clip_config, rngs=rngs), PriorTransformer(self.prior_config, rngs=rngs))

  def frozen(self):
    return nnx.Any(super().frozen(), parts.under(*(f"prior.{n}" for n in PRIOR_STATS)))

  # ------------------------------------------------------------------ statistics
  def fit(self, embeddings: np.ndarray) -> dict:
    return {"mean": embeddings.mean(0).astype(np.float32), "std": (embeddings.std(0) + 1e-6).astype(np.float32)}

  def use_record(self, record: dict) -> None:
    self.stats = {k: np.asarray(record[k], np.float32) for k in ("mean", "std")}

  # ------------------------------------------------------------------ training
  def loss(self, model, batch, rng):
    d = self.config.diffusion
    rng_drop, rng_diff = jax.random.split(rng)
    x0 = normalize(self.embed_images(model, batch["image"]), self.stats)
    drop = jax.random.bernoulli(rng_drop, d.cond_drop_prob, (x0.shape[0],))
    tokens = jnp.where(drop[:, None], jnp.asarray(self.null_tokens)[None], batch["tokens"])
    c = self.condition(model, tokens)
    model_fn = lambda x_t, t: model.prior(x_t, t, proj_embedding=c["embeds"], encoder_hidden_states=c["states"],
                                          attention_mask=c["mask"]).astype(jnp.float32)
    loss, aux = objectives.diffusion_loss(model_fn, self.schedule, x0, rng_diff, prediction_type="sample",
                                          weights=batch["valid"])
    return loss, {"mean_t": aux["mean_t"], "count/skipped_examples": jnp.sum(1.0 - batch["valid"])}

  # ------------------------------------------------------------------ the decoder's interface
  def prior_module(self, rngs: nnx.Rngs) -> nnx.Module:
    return PriorTransformer(self.prior_config, rngs=rngs)

  def prior_select(self) -> tuple[str, ...]:
    return trained_names(self.prior_config)

  def chain_embeddings(self, prior, text_tower, tokens: jax.Array, rng: jax.Array, u) -> jax.Array:
    pad = self.tokenizer.pad_id
    cond = text_condition(text_tower, tokens, pad)
    uncond = text_condition(text_tower, jnp.asarray(self.null_tokens)[None], pad)
    return sample_embeddings(prior, cond, uncond, rng, **self.sampling_options(u))

  def sampling_options(self, u=None) -> dict:
    """`sample_embeddings` options: this prior's schedule and statistics, the sampling settings of `u` (a config's
    `unclip` section; default this run's)."""
    u = u or self.config.unclip
    return dict(stats=self.stats, schedule=self.schedule, sampler=u.sampler, num_steps=int(u.num_steps),
                guidance_scale=float(u.guidance_scale), candidates=int(u.candidates))


def _unrelated(labels: np.ndarray, seed: int) -> np.ndarray:
  """For each row, another row with a different label when one exists (a random derangement otherwise)."""
  rng = np.random.default_rng(seed)
  n = len(labels)
  order = rng.permutation(n)
  for i in range(n):
    if labels[order[i]] == labels[i]:
      others = np.flatnonzero(labels != labels[i])
      if len(others):
        order[i] = rng.choice(others)
  return order

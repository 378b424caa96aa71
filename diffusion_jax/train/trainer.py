"""The one training loop: init sharded → compile → step → log → eval/sample → checkpoint → resume.

Every objective plugs in as a `Task`; nothing here knows about diffusion or contrastive losses.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
import optax

from diffusion_jax.config import ConfigError
from diffusion_jax.data import pipeline
from diffusion_jax.models import tracing
from diffusion_jax.parallel import mesh as mesh_lib, strategies
from diffusion_jax.tasks.base import ModelContext, Task, get_task
from diffusion_jax.train import accumulate, checkpointing, compile_report, optimizer, progress
from diffusion_jax.train.metrics_writer import MetricWriter
from diffusion_jax.train.state import TrainState, ema_decay_at, update_ema


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; the message names the step."""


def _is_spec(x):
  return isinstance(x, P)


class Trainer:

  def __init__(self, config, workdir: str, *, mesh: Optional[jax.sharding.Mesh] = None, task: Optional[Task] = None):
    self.config = config
    self.workdir = os.path.abspath(workdir)
    self.mesh = mesh if mesh is not None else mesh_lib.make_mesh(config.mesh)
    self.rules = mesh_lib.logical_rules(config.sharding)
    self.task = task if task is not None else get_task(config)
    self.is_main = jax.process_index() == 0
    self.total_steps = int(config.train.steps)
    gbs, shards = int(config.train.batch_size), mesh_lib.batch_shards(self.mesh, self.rules)
    if gbs % shards or gbs % jax.process_count():
      raise ConfigError(f"train.batch_size={gbs} must be divisible by the {shards} batch shards of the mesh "
                        f"and the {jax.process_count()} processes")
    self.grad_accum_steps = int(config.train.get("grad_accum_steps", 1))
    accumulate.check_divisible(gbs, self.grad_accum_steps, shards)
    frozen = tuple(config.optim.get("frozen", ())) + tuple(self.task.frozen_parameters())
    self.tx, self.lr_schedule = optimizer.make_optimizer(config.optim, self.total_steps, frozen=frozen)
    self._build_abstract_state()
    self._stop_requested = False

  # ---------------------------------------------------------------- state
  def _init_state(self) -> TrainState:
    model = self.task.build_model(nnx.Rngs(int(self.config.seed)))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    ema = jax.tree.map(jnp.copy, params) if self.config.ema.enabled else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params), ema_params=ema)

  def _build_abstract_state(self):
    abstract_model = tracing.abstract_model(lambda: self.task.build_model(nnx.Rngs(int(self.config.seed))))
    self.graphdef, _, self.rest = nnx.split(abstract_model, nnx.Param, ...)
    if jax.tree.leaves(self.rest):
      raise ValueError("models must keep all state in nnx.Param; found other variables: "
                       f"{jax.tree.structure(self.rest)}")
    with tracing.fast_model_tracing():
      abstract = jax.eval_shape(self._init_state)
    specs = nnx.get_partition_spec(abstract)

    def sharding(spec, x):
      # Optimizer state of frozen parameters is an empty optax.MaskedNode, to which get_partition_spec still
      # gives a spec (or None): it stays an empty node.
      if x is None or isinstance(x, optax.MaskedNode):  # (None: no EMA parameters)
        return x
      spec = P() if spec is None else spec
      return NamedSharding(self.mesh, mesh_lib.fit_spec(mesh_lib.logical_to_mesh(spec, self.rules), x.shape,
                                                        self.mesh))

    self.state_shardings = jax.tree.map(sharding, specs, abstract, is_leaf=lambda x: x is None or _is_spec(x))
    strategies.check_state(self.config.sharding, self.rules, abstract, self.state_shardings, self.mesh)
    self.abstract_state = checkpointing.abstract_with_shardings(abstract, self.state_shardings)
    self.batch_sharding = mesh_lib.batch_sharding(self.mesh, self.rules)

  def init_state(self) -> TrainState:
    """Parameters and optimizer state are created inside jit, directly in their shards."""
    with jax.set_mesh(self.mesh), tracing.fast_model_tracing():
      state = jax.jit(self._init_state, out_shardings=self.state_shardings)()
    weights = self.task.initial_weights()
    return self._with_weights(state, weights) if weights else state

  def _with_weights(self, state: TrainState, weights) -> TrainState:
    """Replaces named parameters (and their EMA copies) with given arrays, each placed in its shard."""
    weights = dict(weights)
    shardings = jax.tree_util.tree_flatten_with_path(self.state_shardings.params)[0]
    sharding_of = {optimizer.param_name(path): s for path, s in shardings}

    def replace(path, leaf):
      name = optimizer.param_name(path)
      if name not in weights:
        return leaf
      value = np.asarray(weights[name])
      if value.shape != leaf.shape:
        raise ValueError(f"initial weight {name} has shape {value.shape}, the model expects {leaf.shape}")
      return jax.device_put(value.astype(leaf.dtype), sharding_of[name])

    params = jax.tree_util.tree_map_with_path(replace, state.params)
    unused = set(weights) - set(sharding_of)
    if unused:
      raise ValueError(f"{len(unused)} initial weights name no model parameter, e.g. {sorted(unused)[:3]}")
    ema = jax.tree_util.tree_map_with_path(replace, state.ema_params) if state.ema_params is not None else None
    logging.info("initialised %d parameters from pretrained weights", len(weights))
    return state.replace(params=params, ema_params=ema)

  # ---------------------------------------------------------------- step
  def _train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    graphdef, rest = self.graphdef, self.rest
    rng = jax.random.fold_in(jax.random.key(int(self.config.seed)), state.step)
    batch = dict(batch, step=state.step)  # for schedules inside a loss (e.g. a GAN term switched on later)

    def loss_fn(params, batch, rng):
      return self.task.loss(nnx.merge(graphdef, params, rest), batch, rng)

    grad_fn = accumulate.value_and_grad(loss_fn, self.grad_accum_steps, self.batch_sharding)
    (loss, metrics), grads = grad_fn(state.params, batch, rng)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: p + u, state.params, updates)
    ema = state.ema_params
    if ema is not None:
      ema = update_ema(ema, params, ema_decay_at(state.step, self.config.ema.decay, self.config.ema.warmup))
    metrics = dict(metrics, loss=loss, grad_norm=_global_norm(grads), lr=self.lr_schedule(state.step))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema), metrics

  def compile_train_step(self, batch_spec: dict):
    jitted = jax.jit(self._train_step, in_shardings=(self.state_shardings, self.batch_sharding),
                     out_shardings=(self.state_shardings, None), donate_argnums=(0,))
    t0 = time.time()
    with jax.set_mesh(self.mesh):
      compiled = jitted.lower(self.abstract_state, batch_spec).compile()
    # XLA's count is one device's share of the partitioned program, and counts the micro-batch scan's body once;
    # the step's FLOPs (perf/flops_per_sec) are over the whole mesh and every micro-batch. Scaling the update
    # outside the scan too overstates a step by a few FLOPs per parameter, far less than leaving it would understate.
    self.step_flops = compile_report.compiled_flops(compiled) * self.grad_accum_steps * self.mesh.size
    mem = compile_report.memory_summary(compiled)
    logging.info("compiled train step in %.1fs; %.3g FLOPs/step; %s", time.time() - t0, self.step_flops, mem)
    return compiled

  # ---------------------------------------------------------------- data
  def _train_dataset(self):
    return self.task.train_dataset(self.workdir, global_batch_size=int(self.config.train.batch_size),
                                   seed=int(self.config.seed), process_index=jax.process_index(),
                                   process_count=jax.process_count())

  def to_global(self, batch: dict) -> dict:
    return mesh_lib.global_batch(self.batch_sharding, batch)

  # ---------------------------------------------------------------- checkpoint
  def checkpointer(self) -> checkpointing.Checkpointer:
    return checkpointing.Checkpointer(os.path.join(self.workdir, "checkpoints"), keep=int(self.config.train.keep_checkpoints),
                                      async_save=bool(self.config.train.async_checkpoints))

  def restore_or_init(self, ckpt: checkpointing.Checkpointer) -> tuple[TrainState, Optional[dict]]:
    step = ckpt.latest_step()
    if step is None:
      return self.init_state(), None
    logging.info("resuming from checkpoint at step %d in %s", step, ckpt.directory)
    with jax.set_mesh(self.mesh):
      return ckpt.restore(step, self.abstract_state)

  def model_context(self, state: TrainState) -> ModelContext:
    params = state.ema_params if state.ema_params is not None and self.config.ema.use_for_eval else state.params
    return ModelContext(graphdef=self.graphdef, params=params, rest=self.rest, mesh=self.mesh, step=int(state.step),
                        workdir=self.workdir, is_main_process=self.is_main, batch_sharding=self.batch_sharding)

  def _on_sigterm(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint at the next step boundary and exiting")
    self._stop_requested = True

  # ---------------------------------------------------------------- modes
  def train(self, *, stop_at: Optional[int] = None) -> TrainState:
    """Trains to `train.steps`, resuming from the newest checkpoint in the workdir.

    `stop_at` ends the run early at that step with a checkpoint, exactly as a preemption would.
    """
    cfg = self.config.train
    self._stop_requested = False
    ds = self._train_dataset()  # a missing or empty dataset fails here, before anything is compiled
    writer = MetricWriter(self.workdir, enabled=self.is_main)
    ckpt = self.checkpointer()
    state, data_state = self.restore_or_init(ckpt)
    start = int(state.step)
    if self.is_main:
      _log_parameter_overview(state.params)
    it = iter(ds)
    if data_state is not None:
      pipeline.set_iterator_state(it, data_state)
    first = self.to_global(next(it)) if start < self.total_steps else None
    step_fn = self.compile_train_step(_spec_of(first)) if first is not None else None
    previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm) if _in_main_thread() else None
    config_json = self.config.to_json_best_effort()
    bar = progress.ProgressBar(start, self.total_steps, enabled=self.is_main and cfg.progress_bar)
    meter = progress.StepMeter(self.step_flops, int(cfg.batch_size))
    accum = progress.MetricAccumulator()
    pending = None  # metrics of the step before, fetched one step late so dispatch never waits on the host

    def settle(pending):
      step_no, metrics = pending
      host = jax.device_get(metrics)
      if not np.isfinite(host["loss"]):
        raise NonFiniteLossError(f"loss is {host['loss']} at step {step_no}; stopping (last checkpoint kept)")
      accum.add(host)
      bar.update(step_no, host["loss"])

    saved_step = start
    try:
      step = start
      while step < self.total_steps:
        if self._stop_requested or (stop_at is not None and step >= stop_at):
          self._stop_requested = True
          break
        batch, first = (first, None) if first is not None else (self.to_global(next(it)), None)
        with jax.transfer_guard("disallow"):  # everything the step needs is already on device
          state, metrics = step_fn(state, batch)
        if pending is not None:
          settle(pending)
        step += 1
        pending = (step, metrics)
        meter.tick(step)
        at_end = step == self.total_steps
        if step % cfg.log_every == 0 or at_end:
          settle(pending); pending = None
          scalars = {f"train/{k}": v for k, v in accum.flush().items()}
          scalars.update(meter.rates(step))
          writer.write_scalars(step, scalars)
        if step % cfg.checkpoint_every == 0 or at_end:
          if pending is not None:
            settle(pending); pending = None
          ckpt.save(step, state, data_state=pipeline.get_iterator_state(it), config_json=config_json)
          saved_step = step
        if (cfg.eval_every and step % cfg.eval_every == 0) or (at_end and cfg.eval_at_end):
          self._evaluate(state, writer)
          meter.restart(step)
        if (cfg.sample_every and step % cfg.sample_every == 0) or (at_end and cfg.sample_at_end):
          self._sample(state, writer)
          meter.restart(step)
      if pending is not None:
        settle(pending)
      if self._stop_requested and saved_step < int(state.step):
        ckpt.save(int(state.step), state, data_state=pipeline.get_iterator_state(it), config_json=config_json,
                  wait=True)
        logging.warning("stopped early at step %d; checkpoint saved", int(state.step))
    finally:
      bar.close()
      ckpt.close()
      writer.close()
      _close_iterator(it)
      if previous_handler is not None:
        signal.signal(signal.SIGTERM, previous_handler)
    return state

  def load_for_inference(self) -> TrainState:
    ckpt = self.checkpointer()
    try:
      step = ckpt.latest_step()
      if step is None:
        raise ConfigError(f"no checkpoint in {ckpt.directory}: train first (--mode train) or point --workdir at a run")
      with jax.set_mesh(self.mesh):
        state, _ = ckpt.restore(step, self.abstract_state)
      return state
    finally:
      ckpt.close()

  def _evaluate(self, state: TrainState, writer: MetricWriter) -> dict:
    t0 = time.time()
    with jax.set_mesh(self.mesh):
      metrics = self.task.evaluate(self.model_context(state))
    if metrics:
      metrics = {k if "/" in k else f"eval/{k}": float(v) for k, v in metrics.items()}
      metrics["eval/seconds"] = time.time() - t0
      writer.write_scalars(int(state.step), metrics)
      logging.info("eval at step %d: %s", int(state.step), {k: round(v, 4) for k, v in metrics.items()})
    return metrics

  def _sample(self, state: TrainState, writer: MetricWriter) -> dict:
    out_dir = os.path.join(self.workdir, "samples", f"step_{int(state.step)}")
    with jax.set_mesh(self.mesh):
      info = self.task.sample(self.model_context(state), out_dir)
    if info.get("grid_image") is not None:
      writer.write_image(int(state.step), "samples", info["grid_image"])
    if self.is_main and info:
      logging.info("wrote samples to %s", out_dir)
    return info

  def evaluate(self) -> dict:
    writer = MetricWriter(self.workdir, enabled=self.is_main)
    try:
      return self._evaluate(self.load_for_inference(), writer)
    finally:
      writer.close()

  def sample(self) -> dict:
    writer = MetricWriter(self.workdir, enabled=self.is_main)
    try:
      return self._sample(self.load_for_inference(), writer)
    finally:
      writer.close()


def _spec_of(batch: dict) -> dict:
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in batch.items()}


def _global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _log_parameter_overview(params) -> None:
  try:
    from clu import parameter_overview
    logging.info("parameters:\n%s", parameter_overview.get_parameter_overview(params.to_pure_dict()))
  except Exception as e:  # the overview is informational only
    logging.info("parameter overview unavailable: %s", e)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  logging.info("total parameters: %s", f"{n:,}")


def _in_main_thread() -> bool:
  import threading
  return threading.current_thread() is threading.main_thread()


def _close_iterator(it) -> None:
  close = getattr(it, "close", None)
  if callable(close):
    close()

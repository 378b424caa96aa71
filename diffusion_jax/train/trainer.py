"""The one training loop: init sharded → compile → step → log → eval/sample → checkpoint → resume.

Every objective plugs in as a `Task` (`train.task`); nothing here knows about diffusion, contrastive or GAN losses.
A task's model is cut into parts (`train.parts`): parameters trained by each named update, frozen parameters and
mutable state. One compiled step runs every update in order — each with its own loss, optimizer, repeat count and
gradients of its own parameters only — carries the mutable state, and updates the EMA of the updates that keep one.
Frozen parameters are an argument of the step, never differentiated, rebuilt at every start from their init and
the task's weight sources (`train.runs`).
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from diffusion_jax.config import ConfigError
from diffusion_jax.data import pipeline
from diffusion_jax.data.records import DataError
from diffusion_jax.models import tracing
from diffusion_jax.parallel import mesh as mesh_lib, strategies
from diffusion_jax.train import (accumulate, adapters, checkpointing, compile_report, evaluators as evaluators_lib,
                                 optimizer, parts, progress, runs)
from diffusion_jax.train.metrics_writer import MetricWriter
from diffusion_jax.train.state import TrainState, all_finite, ema_decay_at, update_ema
from diffusion_jax.train.task import ModelContext, Task, get_task

FINISHED_FILE = "finished.json"  # the end-of-run evaluation and sampling that completed, so a rerun can skip them
_DATA_CHECK_STEPS = 10  # the share of unreadable examples is judged over this many first steps


class NonFiniteError(FloatingPointError):
  """The loss or the state became NaN or Inf; the message names the step and the last good checkpoint."""



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
    self.updates = tuple(self.task.updates())
    self.partition = adapters.partition(self.task, config)
    self.grad_accum_steps = int(config.train.grad_accum_steps)
    self._check_batch()
    self.optimizers = {}
    for u in self.updates:
      self.optimizers[u.name] = optimizer.make_optimizer(optimizer.section(config, u.optimizer),
                                                         self.total_steps * u.repeat)
    self.ema_names = parts.ema_updates(config.ema.updates, self.updates) if config.ema.enabled else []
    self._build_abstract_state()
    self.evaluators = evaluators_lib.make_evaluators(self.task, config)
    self._jit_cache: dict = {}
    self.step_flops = 0.0
    self.frozen = None  # the frozen parameters, once restored or initialised
    self.provenance: list[dict] = []  # where the frozen parameters came from (saved with every checkpoint)
    self._stop_requested = None  # the signal's name once one asks the run to stop

  def _check_batch(self) -> None:
    gbs, shards = int(self.config.train.batch_size), mesh_lib.batch_shards(self.mesh, self.rules)
    if gbs <= 0 or gbs % shards or gbs % jax.process_count():
      raise ConfigError(f"train.batch_size={gbs} must be a positive multiple of the {shards} batch shards of the "
                        f"mesh and the {jax.process_count()} processes")
    for u in self.updates:
      rows = gbs // u.repeat if u.split_batch else gbs
      if u.split_batch and gbs % u.repeat:
        raise ConfigError(f"train.batch_size={gbs} does not split into the {u.repeat} repeats of update {u.name!r}")
      accumulate.check_divisible(rows, self.grad_accum_steps, shards)

  # ---------------------------------------------------------------- state
  def _build_model(self) -> nnx.Module:
    return adapters.build_model(self.task, self.config, nnx.Rngs(int(self.config.seed)))

  def _init_parts(self):
    model = self._build_model()
    model.train()
    _, frozen, params, mutable = self.partition.split(model)
    return frozen, params, mutable

  def _init_state(self) -> TrainState:
    _, params, mutable = self._init_parts()
    opt_state = {name: self.optimizers[name][0].init(p) for name, p in params.items()}
    ema = {name: jax.tree.map(jnp.copy, params[name]) for name in self.ema_names}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, ema=ema, mutable=mutable)

  def _init_frozen(self) -> nnx.State:
    return self._init_parts()[0]

  def _shardings(self, abstract):
    specs = nnx.get_partition_spec(abstract)

    def sharding(spec, x):
      if x is None or isinstance(x, optax.MaskedNode):
        return x
      spec = P() if spec is None else spec
      return NamedSharding(self.mesh, mesh_lib.fit_spec(mesh_lib.logical_to_mesh(spec, self.rules), x.shape,
                                                        self.mesh))

    return jax.tree.map(sharding, specs, abstract, is_leaf=lambda x: x is None or _is_spec(x))

  def _build_abstract_state(self):
    model = tracing.abstract_model(self._build_model)
    parts.check_patterns_match(model, self.config.train.frozen, "train.frozen")
    self.partition.check(model)
    model.train()
    self.graphdef = self.partition.split(model)[0]
    model.eval()
    self.eval_graphdef = self.partition.split(model)[0]
    with tracing.fast_model_tracing():
      abstract = jax.eval_shape(self._init_state)
      abstract_frozen = jax.eval_shape(self._init_frozen)
    self.state_shardings = self._shardings(abstract)
    self.frozen_shardings = self._shardings(abstract_frozen)
    strategies.check_state(self.config.sharding, self.rules, abstract, self.state_shardings, self.mesh)
    self.abstract_state = checkpointing.abstract_with_shardings(abstract, self.state_shardings)
    self.abstract_frozen = checkpointing.abstract_with_shardings(abstract_frozen, self.frozen_shardings)
    self.batch_sharding = mesh_lib.batch_sharding(self.mesh, self.rules)

  def init_state(self) -> TrainState:
    """Parameters and optimizer state are created inside jit, directly in their shards."""
    with jax.set_mesh(self.mesh), tracing.fast_model_tracing():
      return jax.jit(self._init_state, out_shardings=self.state_shardings)()

  def init_frozen(self) -> nnx.State:
    """The frozen parameters at their initialisation (before any weight source fills them), in their shards."""
    with jax.set_mesh(self.mesh), tracing.fast_model_tracing():
      return jax.jit(self._init_frozen, out_shardings=self.frozen_shardings)()

  # ---------------------------------------------------------------- weights from elsewhere
  def weight_sources(self) -> list:
    """The task's weight sources; under LoRA they all fill frozen parameters at every start, and the base run
    (`lora.base_workdir`) joins them."""
    sources = list(self.task.weight_sources())
    if adapters.lora_config(self.config) is None:
      return sources
    for source in sources:
      source.frozen = True  # what they fill no longer trains, so no checkpoint holds it
    if self.config.lora.base_workdir:
      sources.append(runs.RunSource("lora.base_workdir", self.config.lora.base_workdir,
                                    task=self.task.base_tasks or self.config.task, frozen=True))
    return sources

  def _apply_sources(self, state: TrainState, frozen: nnx.State, *, fresh: bool,
                     recorded: Optional[list]) -> tuple[TrainState, nnx.State]:
    """Frozen parameters from the task's sources (every start); trainable ones and mutable state too when `fresh`.

    A resumed run first checks that the sources of its frozen parameters are those it recorded.
    """
    sources = self.weight_sources()
    self.provenance = [s.describe() for s in sources if s.frozen and s.recorded]
    if recorded is not None:
      runs.check_unchanged(recorded, self.provenance, accept=bool(self.config.train.accept_changed_sources))
    targets = {"frozen": parts.flat_names(frozen), "mutable": parts.flat_names(state.mutable)}
    for name, p in state.params.items():
      targets[f"params.{name}"] = parts.flat_names(p)
    for source in sources:
      if not fresh and not source.frozen:
        continue  # trainable weights of a resumed run come from its checkpoint
      arrays = source.named(self.mesh, self.rules)
      used = set()
      for where, leaves in targets.items():
        if where != "frozen" and not fresh:
          continue
        mine = {k: v for k, v in arrays.items() if k in leaves}
        used |= set(mine)
        leaves.update(runs.place(mine, leaves, source.what))
      unused = sorted(set(arrays) - used - (set() if fresh else _all_names(targets)))
      if unused:
        raise ConfigError(f"{source.what}: {len(unused)} weights name no parameter of this model, e.g. {unused[:3]}")
      logging.info("%s: %d weights from %s", source.what, len(used), source.path)
    frozen = _replace(frozen, targets["frozen"])
    if fresh:
      params = {name: _replace(p, targets[f"params.{name}"]) for name, p in state.params.items()}
      ema = {name: jax.tree.map(jnp.copy, params[name]) for name in state.ema}  # the EMA starts where they start
      state = state.replace(params=params, ema=ema, mutable=_replace(state.mutable, targets["mutable"]))
    return state, frozen

  # ---------------------------------------------------------------- step
  def _merge(self, graphdef, frozen, params, mutable, *, copy=False) -> nnx.Module:
    return self.partition.merge(graphdef, frozen, params, mutable, copy=copy)

  def _update(self, update: parts.Update, state: TrainState, params: dict, opt_states: dict, mutable, frozen,
              batch: dict, rng: jax.Array):
    """The optimizer steps of one update: (its parameters, its optimizer state, mutable state, metrics)."""
    tx, schedule = self.optimizers[update.name]

    def loss_fn(p, mut, b, r):
      model = self._merge(self.graphdef, frozen, {**params, update.name: p}, mut, copy=True)
      loss, metrics = update.loss(model, b, r)
      return loss, (metrics, nnx.state(model, nnx.Not(nnx.Param)))

    grad_fn = accumulate.value_and_grad(loss_fn, self.grad_accum_steps, self.batch_sharding)

    def one(carry, xs):
      p, o, mut = carry
      r, b, k = xs
      (loss, (metrics, mut)), grads = grad_fn(p, mut, b, r)
      updates, o = tx.update(grads, o, p)
      p = optax.apply_updates(p, updates)
      metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                     lr=schedule(state.step * update.repeat + k))
      return (p, o, mut), metrics

    carry = (params[update.name], opt_states[update.name], mutable)
    if update.repeat == 1:
      (p, o, mut), metrics = one(carry, (rng, batch, 0))
      return p, o, mut, metrics
    ks = jnp.arange(update.repeat)
    rngs = jax.vmap(lambda k: jax.random.fold_in(rng, k))(ks)
    if update.split_batch:
      batches = accumulate.split_rows(batch, update.repeat, self.batch_sharding)
      scalars = {k: v for k, v in batches.items() if jnp.ndim(v) == 0}
      batches = {k: v for k, v in batches.items() if jnp.ndim(v) > 0}
      body = lambda c, xs: one(c, (xs[0], dict(xs[1], **scalars), xs[2]))
      (p, o, mut), metrics = jax.lax.scan(body, carry, (rngs, batches, ks))
    else:
      (p, o, mut), metrics = jax.lax.scan(lambda c, xs: one(c, (xs[0], batch, xs[1])), carry, (rngs, ks))
    metrics = {k: jnp.sum(v) if k.startswith("count/") else jnp.mean(v) for k, v in metrics.items()}
    return p, o, mut, metrics

  def _train_step(self, state: TrainState, frozen: nnx.State, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(jax.random.key(int(self.config.seed)), state.step)
    batch = dict(batch, step=state.step)  # for schedules inside a loss (e.g. a GAN term switched on later)
    params, opt_states, mutable = dict(state.params), dict(state.opt_state), state.mutable
    out: dict[str, Any] = {}
    several = len(self.updates) > 1
    for i, update in enumerate(self.updates):
      # The first update draws exactly what a one-update step draws, so adding updates keeps its randomness.
      update_rng = rng if i == 0 else jax.random.fold_in(rng, 1_000_003 * i)
      p, o, mutable, metrics = self._update(update, state, params, opt_states, mutable, frozen, batch, update_rng)
      params[update.name], opt_states[update.name] = p, o
      out.update({f"{update.name}/{k}" if several else k: v for k, v in metrics.items()})
    ema = dict(state.ema)
    if ema:
      decay = ema_decay_at(state.step, self.config.ema.decay, self.config.ema.warmup)
      ema = {name: update_ema(e, params[name], decay) for name, e in ema.items()}
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_states, ema=ema, mutable=mutable)
    out["state_finite"] = all_finite((new.params, new.opt_state, new.ema, new.mutable))
    if "valid" in batch:
      out["valid_examples"] = jnp.sum(batch["valid"].astype(jnp.float32))
    return new, out

  def compile_train_step(self, batch_spec: dict):
    jitted = jax.jit(self._train_step, in_shardings=(self.state_shardings, self.frozen_shardings, self.batch_sharding),
                     out_shardings=(self.state_shardings, None), donate_argnums=(0,))
    t0 = time.time()
    with jax.set_mesh(self.mesh):
      compiled = jitted.lower(self.abstract_state, self.abstract_frozen, batch_spec).compile()
    # XLA's count is one device's share of the partitioned program, and counts the micro-batch scan's body once;
    # the step's FLOPs (perf/flops_per_sec) are over the whole mesh and every micro-batch. Scaling the update
    # outside the scan too overstates a step by a few FLOPs per parameter, far less than leaving it would understate.
    self.step_flops = compile_report.compiled_flops(compiled) * self.grad_accum_steps * self.mesh.size
    mem = compile_report.memory_summary(compiled)
    logging.info("compiled train step in %.1fs; %.3g FLOPs/step; %s", time.time() - t0, self.step_flops, mem)
    return compiled

  # ---------------------------------------------------------------- checkpoints and contexts
  def to_global(self, batch: dict) -> dict:
    return mesh_lib.global_batch(self.batch_sharding, batch)

  def checkpointer(self, *, create: bool = True) -> checkpointing.Checkpointer:
    return checkpointing.Checkpointer(os.path.join(self.workdir, "checkpoints"),
                                      keep=int(self.config.train.keep_checkpoints),
                                      async_save=bool(self.config.train.async_checkpoints), create=create)

  def restore_or_init(self, ckpt: checkpointing.Checkpointer, *, init: bool = True
                      ) -> tuple[Optional[TrainState], Optional[dict]]:
    """The newest readable checkpoint (or, with `init`, a fresh state), with the frozen parameters in `self.frozen`."""
    with jax.set_mesh(self.mesh):
      state, items = ckpt.restore_latest(self.abstract_state)
    fresh = state is None
    if fresh:
      if not init:
        return None, None
      state = self.init_state()
    else:
      logging.info("resuming from checkpoint at step %d in %s", int(state.step), ckpt.directory)
    recorded = None if fresh else items.get("sources", {}).get("sources", [])
    state, self.frozen = self._apply_sources(state, self.init_frozen(), fresh=fresh, recorded=recorded)
    return state, items.get("data")

  def model_context(self, state: TrainState) -> ModelContext:
    params = state.eval_params(bool(self.config.ema.use_for_eval))
    return ModelContext(graphdef=self.eval_graphdef, states=(self.frozen, *params.values(), state.mutable),
                        mesh=self.mesh, step=int(state.step), workdir=self.workdir, is_main_process=self.is_main,
                        batch_sharding=self.batch_sharding, jit_cache=self._jit_cache)

  def _request_stop(self, signum, frame):
    name = signal.Signals(signum).name
    if self._stop_requested and signum == signal.SIGINT:
      logging.warning("second SIGINT: exiting now, without a checkpoint")
      os._exit(130)
    logging.warning("%s received: saving a checkpoint at the next step boundary and exiting%s", name,
                    " (press Ctrl-C again to exit at once)" if signum == signal.SIGINT else "")
    self._stop_requested = name

  # ---------------------------------------------------------------- modes
  def train(self, *, stop_at: Optional[int] = None) -> TrainState:
    """Trains to `train.steps`, resuming from the newest checkpoint in the workdir.

    `stop_at` ends the run early at that step with a checkpoint, exactly as a preemption would.
    """
    cfg = self.config.train
    self._stop_requested = None
    self.task.check_run()  # a missing dataset or a run that could not end fails here, before any compile
    ckpt = self.checkpointer()
    handlers = {}
    try:
      state, data_state = self.restore_or_init(ckpt)
      start = int(state.step)
      writer = MetricWriter(self.workdir, enabled=self.is_main)
      writer.truncate_after(start)  # rows a killed run logged after its last checkpoint are logged again
      if start >= self.total_steps:
        logging.info("nothing to train: the run in %s finished at step %d (train.steps=%d)", self.workdir, start,
                     self.total_steps)
        self._finish(state, writer, prepared=False)
        writer.close()
        return state
      if self.is_main:
        _log_parameter_overview(state.params)
      ctx = self.model_context(state)
      self.task.prepare(ctx, training=True)
      ds = self.task.train_dataset(ctx, global_batch_size=int(cfg.batch_size), seed=int(self.config.seed))
      it = iter(ds)
      if data_state is not None:
        pipeline.set_iterator_state(it, data_state)
      if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.signal(s, self._request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
      try:
        state = self._loop(state, it, ckpt, writer, stop_at)
      finally:
        _close_iterator(it)
        writer.close()
    finally:
      for s, h in handlers.items():
        signal.signal(s, h)
      ckpt.close()
    return state

  def _loop(self, state: TrainState, it, ckpt, writer, stop_at) -> TrainState:
    cfg = self.config.train
    start = int(state.step)
    first = self.to_global(next(it))
    step_fn = self.compile_train_step(_spec_of(first))
    config_json = self.config.to_json_best_effort()
    bar = progress.ProgressBar(start, self.total_steps, enabled=self.is_main and cfg.progress_bar)
    meter = progress.StepMeter(self.step_flops, int(cfg.batch_size))
    accum = progress.MetricAccumulator()
    data_check = [0.0, 0.0]  # (valid, total) examples of the first steps
    saved = [start]
    pending = None  # metrics of the step before, fetched one step late so dispatch never waits on the host

    def settle(pending):
      step_no, metrics = pending
      host = jax.device_get(metrics)
      self._check_finite(step_no, host, saved[0])
      self._check_data(step_no, host, data_check)
      accum.add(host)
      bar.update(step_no, host.get("loss", host.get(f"{self.updates[0].name}/loss", 0.0)))

    def save(step, wait=False):
      ckpt.save(step, state, data_state=pipeline.get_iterator_state(it), config_json=config_json,
                sources=self.provenance, wait=wait)
      saved[0] = step

    try:
      step = start
      while step < self.total_steps:
        if self._stop_requested or (stop_at is not None and step >= stop_at):
          self._stop_requested = self._stop_requested or "stop_at"
          break
        batch, first = (first, None) if first is not None else (self.to_global(next(it)), None)
        with jax.transfer_guard("disallow"):  # everything the step needs is already on device
          state, metrics = step_fn(state, self.frozen, batch)
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
          save(step)
        if not at_end and self._evaluate_if_due(state, writer, at_end=False):
          meter.restart(step)
        if cfg.sample_every and step % cfg.sample_every == 0 and not at_end:
          self._sample(state, writer)
          meter.restart(step)
      if pending is not None:
        settle(pending)
      if self._stop_requested and saved[0] < int(state.step):
        save(int(state.step), wait=True)
      if self._stop_requested:
        logging.warning("stopped at step %d (%s); checkpoint saved, run again to resume", int(state.step),
                        self._stop_requested)
      else:
        self._finish(state, writer, prepared=True)
    finally:
      bar.close()
    return state

  def _check_finite(self, step: int, host: dict, last_saved: int) -> None:
    bad = [k for k, v in host.items() if k.endswith("loss") and not np.isfinite(v)]
    if bad or not bool(host.get("state_finite", True)):
      what = f"{bad[0]} is {host[bad[0]]}" if bad else "the parameters or optimizer state became NaN/Inf"
      kept = f"step {last_saved}" if last_saved else "none (the run never saved one)"
      raise NonFiniteError(f"{what} at step {step}; stopping without saving it. Last good checkpoint: {kept} in "
                           f"{os.path.join(self.workdir, 'checkpoints')}")

  def _check_data(self, step: int, host: dict, seen: list) -> None:
    if "valid_examples" not in host:
      return
    batch = int(self.config.train.batch_size)
    valid = float(host["valid_examples"])
    if valid == 0:
      raise DataError(f"every one of the {batch} examples of the batch for step {step} was unreadable (undecodable "
                      "or missing images): check data.source and data.path")
    if step <= _DATA_CHECK_STEPS:
      seen[0] += valid
      seen[1] += batch
      limit = float(self.config.train.max_unreadable_fraction)
      if step == min(_DATA_CHECK_STEPS, self.total_steps) and seen[1] - seen[0] > limit * seen[1]:
        raise DataError(f"{int(seen[1] - seen[0])} of the first {int(seen[1])} training examples were unreadable "
                        f"(undecodable or missing images), more than train.max_unreadable_fraction={limit}")

  def _finish(self, state: TrainState, writer: MetricWriter, *, prepared: bool) -> None:
    """The end-of-run evaluation and samples, unless an earlier invocation of this finished run completed them."""
    cfg, step = self.config.train, int(state.step)
    path = os.path.join(self.workdir, FINISHED_FILE)
    done = {}
    if os.path.exists(path):
      with open(path) as f:
        done = json.load(f)
      if done.get("step") != step:
        done = {}
    evals = {name: e for name, e in self.evaluators.items()
             if e.due(step, int(cfg.eval_every), at_end=bool(cfg.eval_at_end))}
    todo = {"evaluated": (lambda: self._evaluate(state, writer, evals)) if evals else None,
            "sampled": (lambda: self._sample(state, writer))
                       if cfg.sample_at_end or (cfg.sample_every and step % cfg.sample_every == 0) else None}
    for what, run in todo.items():
      if run is None or done.get(what):
        continue
      if not prepared:
        self.task.prepare(self.model_context(state), training=False)
        prepared = True
      run()
      done[what] = True
      if self.is_main:
        _write_json(path, {"step": step, **done})

  def load_for_inference(self) -> TrainState:
    ckpt_dir = os.path.join(self.workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
      raise ConfigError(f"no checkpoint in {ckpt_dir}: train first (--mode train) or point --workdir at a run")
    ckpt = self.checkpointer(create=False)
    try:
      state, _ = self.restore_or_init(ckpt, init=False)
    finally:
      ckpt.close()
    if state is None:
      raise ConfigError(f"no checkpoint in {ckpt_dir}: train first (--mode train) or point --workdir at a run")
    self.task.prepare(self.model_context(state), training=False)
    return state

  def _evaluate_if_due(self, state: TrainState, writer: MetricWriter, *, at_end: bool) -> dict:
    step = int(state.step)
    due = {name: e for name, e in self.evaluators.items()
           if e.due(step, int(self.config.train.eval_every), at_end)}
    return self._evaluate(state, writer, due) if due else {}

  def _evaluate(self, state: TrainState, writer: MetricWriter, due: dict) -> dict:
    t0 = time.time()
    with jax.set_mesh(self.mesh):
      metrics = evaluators_lib.run_all(due, self.model_context(state))
    if metrics:
      metrics["eval/seconds"] = time.time() - t0
      writer.write_scalars(int(state.step), metrics)
      logging.info("eval at step %d: %s", int(state.step), {k: round(v, 4) for k, v in metrics.items()})
    return metrics

  def _sample(self, state: TrainState, writer: MetricWriter) -> dict:
    from diffusion_jax.eval import image_io
    name = f"step_{int(state.step)}"
    out_dir = image_io.new_sample_dir(os.path.join(self.workdir, "samples"), name) if self.is_main else ""
    with jax.set_mesh(self.mesh):
      info = self.task.sample(self.model_context(state), out_dir)
    if info.get("grid_image") is not None:
      writer.write_image(int(state.step), "samples", info["grid_image"])
    if self.is_main and info:
      logging.info("wrote samples to %s", out_dir)
    return info

  def evaluate(self) -> dict:
    state = self.load_for_inference()
    writer = MetricWriter(self.workdir, enabled=self.is_main)
    try:
      return self._evaluate_if_due(state, writer, at_end=True)
    finally:
      writer.close()

  def sample(self) -> dict:
    state = self.load_for_inference()
    writer = MetricWriter(self.workdir, enabled=self.is_main)
    try:
      return self._sample(state, writer)
    finally:
      writer.close()


def _spec_of(batch: dict) -> dict:
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in batch.items()}


def _replace(state, by_name: dict):
  """`state` with the leaves named in `by_name` replaced."""
  return jax.tree_util.tree_map_with_path(lambda path, leaf: by_name.get(parts.dotted(path), leaf), state)


def _all_names(targets: dict) -> set:
  return {name for leaves in targets.values() for name in leaves}


def _log_parameter_overview(params: dict) -> None:
  try:
    from clu import parameter_overview
    for name, p in params.items():
      logging.info("parameters of update %r:\n%s", name, parameter_overview.get_parameter_overview(p.to_pure_dict()))
  except Exception as e:  # the overview is informational only
    logging.info("parameter overview unavailable: %s", e)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  logging.info("total parameters: %s", f"{n:,}")


def _write_json(path: str, obj: dict) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f)
  os.replace(path + ".tmp", path)


def _close_iterator(it) -> None:
  close = getattr(it, "close", None)
  if callable(close):
    close()

"""Sharding strategies by config on 8 fake CPU devices: for each model family (DiT, U-Net, ViT/CLIP, VAE), two steps
under FSDP, tensor and FSDP×tensor parallelism (and data parallelism for the U-Net) give the single-device losses
and parameters; FSDP keeps at most
1.2/8 of the state on a device; a large parameter left replicated under FSDP is refused by name."""
import collections
import concurrent.futures
import dataclasses
import importlib
import os

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from diffusion_jax.config import ConfigError
from diffusion_jax.parallel import mesh as mesh_lib, strategies
from diffusion_jax.plan import batch_spec
from diffusion_jax.train.parts import dotted as param_name
from diffusion_jax.train.trainer import Trainer
from tests.toy_task import toy_config

# The tiny test configs, some cut to one level; their widths are multiples of 8, so FSDP over 8 devices splits
# nearly every byte.
FAMILIES = {
    "dit": ("configs.mnist_dit", "tiny", {}),
    # One level with its transformer in the mid block: the tiny U-Net's other transformers triple its compile time.
    "unet": ("configs.mnist_ddpm", "tiny", {"block_out_channels": (8,), "attention_levels": (False,),
                                            "mid_block_attention": True}),
    "clip": ("configs.mnist_clip", "tiny", {}),
    # The tiny VAE has no attention; a mid-block attention gives tensor parallelism something to split.
    "vae": ("configs.emoji_vae", "tiny", {"block_out_channels": (8,), "mid_block_attention": True}),
}
# (strategy, mesh shape over ('data', 'fsdp', 'tensor'), families): 2-D meshes, where FSDP splits the parameters
# 8 ways, for every family; a 3-D mesh (data × fsdp × tensor: parameters split 4 ways, replicated over 'data') for
# the DiT only, and plain data parallelism for the U-Net (the other families' task tests run it through the CLI),
# as each case costs a compile of its own.
CASES = (("fsdp", (1, 8, 1), tuple(FAMILIES)), ("tensor", (4, 1, 2), tuple(FAMILIES)),
         ("fsdp_tensor", (1, 4, 2), tuple(FAMILIES)), ("fsdp_tensor", (2, 2, 2), ("dit",)),
         ("data", (8, 1, 1), ("unet",)))
STEPS = 2
BATCH = 8


def _config(family, strategy="data", shape=(1, 1, 1)):
  module, arg, model = FAMILIES[family]
  c = importlib.import_module(module).get_config(arg)
  c.model.update(model)
  c.mesh.shape = shape
  c.sharding.strategy = strategy
  c.train.batch_size = BATCH
  c.optim.warmup_steps = 0  # the first step already moves every parameter
  # Adam's first step is lr·g/(|g| + eps): with the default eps a gradient that is zero up to rounding (a key bias,
  # to which softmax is blind) moves by up to lr in a direction set by the summation order. A larger eps keeps
  # such noise out of the parameters while real gradients still move them.
  c.optim.eps = 1e-3
  return c


def _batches(config):
  """STEPS synthetic batches of the shape the data pipeline yields (the data sources are not under test)."""
  rng = np.random.default_rng(0)
  out = []
  for _ in range(STEPS):
    spec = batch_spec(config)
    out.append({
        "image": rng.uniform(-1, 1, spec["image"].shape).astype(np.float32),
        "tokens": rng.integers(1, 10, spec["tokens"].shape).astype(np.int32),
        "label": rng.integers(0, 10, spec["label"].shape).astype(np.int32),
        "valid": np.ones(spec["valid"].shape, np.float32)})
  return out


def _initial_state(abstract):
  """Random parameters (EMA alike), zero optimizer state: every run of a family starts from the same values without
  compiling the model's initialisers, the slowest compile of a tiny model (`test_trainer` covers sharded init)."""
  rng = np.random.default_rng(1)

  def fill(path, x):
    if not isinstance(path[0], jax.tree_util.GetAttrKey) or path[0].name not in ("params", "ema"):
      return np.zeros(x.shape, x.dtype)  # step, Adam's moments and count
    scale = 1.0 if param_name(path).endswith("scale") else 0.0  # norm scales around 1
    return (scale + 0.05 * rng.standard_normal(x.shape)).astype(x.dtype)

  params = jax.tree_util.tree_map_with_path(fill, abstract.params)
  state = jax.tree_util.tree_map_with_path(fill, abstract)
  return state.replace(params=params, ema={name: params[name] for name in abstract.ema})


def _bytes_on_each_device(tree) -> collections.Counter:
  found = collections.Counter()
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      found[shard.device] += shard.data.nbytes
  return found


@dataclasses.dataclass
class Run:
  losses: list
  params: dict  # dotted name → numpy array after the steps
  specs: dict  # dotted name → PartitionSpec
  state_total: int  # bytes of parameters + optimizer state
  state_most_on_a_device: int  # ... on the fullest device, from the arrays' addressable shards
  all_state_total: int  # every array of the train state (EMA and step included)
  compiled_arguments: int  # per-device argument bytes of the compiled step (state + batch shard)
  batch_per_device: int


def _train(family, strategy="data", shape=(1, 1, 1)) -> Run:
  config = _config(family, strategy, shape)
  trainer = Trainer(config, "/nonexistent")
  state = jax.device_put(_initial_state(trainer.abstract_state), trainer.state_shardings)
  frozen = jax.device_put(jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), trainer.abstract_frozen),
                          trainer.frozen_shardings)
  held = _bytes_on_each_device((state.params, state.opt_state))
  state_total = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))
  all_total = sum(x.nbytes for x in jax.tree.leaves(state))
  batches = [trainer.to_global(b) for b in _batches(config)]
  step = trainer.compile_train_step(batch_spec(config, trainer.batch_sharding))
  memory = step.memory_analysis()
  losses = []
  for batch in batches:
    state, metrics = step(state, frozen, batch)
    losses.append(float(metrics["loss"]))
  flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
  names = [param_name(path) for path, _ in flat]
  return Run(losses=losses, params={n: np.asarray(x) for n, (_, x) in zip(names, flat)},
             specs={n: x.sharding.spec for n, (_, x) in zip(names, flat)},
             state_total=state_total, state_most_on_a_device=max(held.values()), all_state_total=all_total,
             compiled_arguments=memory.argument_size_in_bytes if memory is not None else -1,
             batch_per_device=sum(b.addressable_shards[0].data.nbytes for b in batches[0].values()))


@pytest.fixture(scope="module")
def runs():
  """Every run of the module, (family, strategy, mesh shape) → future of its `Run`, compiled a few at a time:
  compiling is most of the time of a tiny model, and XLA compiles outside the GIL."""
  cases = [(f, "data", (1, 1, 1)) for f in FAMILIES] + [(f, s, m) for s, m, families in CASES for f in families]
  cases.sort(key=lambda case: case[0] != "unet")  # the slowest compiles first, so the workers finish together
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
    return {case: pool.submit(_train_in_worker, *case) for case in cases}


def _train_in_worker(*case) -> Run:
  nnx.use_eager_sharding(False)  # NNX keeps this setting per thread; importing diffusion_jax sets the main thread's
  return _train(*case)


@pytest.mark.parametrize("strategy, shape, family", [
    pytest.param(s, m, f, id=f"{f}-{s}-{'x'.join(map(str, m))}") for s, m, families in CASES for f in families])
def test_strategy_equals_one_device(runs, strategy, shape, family):
  ref, got = runs[family, "data", (1, 1, 1)].result(), runs[family, strategy, shape].result()
  np.testing.assert_allclose(got.losses, ref.losses, rtol=2e-5)
  assert got.params.keys() == ref.params.keys()
  for name in ref.params:
    np.testing.assert_allclose(got.params[name], ref.params[name], rtol=1e-4, atol=1e-6, err_msg=name)

  # The strategy really split what it promises (else the equality above proves nothing).
  used = collections.Counter(a for spec in got.specs.values() for entry in spec
                             for a in ((entry,) if isinstance(entry, str) else entry or ()))
  if "fsdp" in strategy:
    assert used["fsdp"] >= len(got.specs) // 2, got.specs
  if "tensor" in strategy:
    attention = [n for n in got.specs if n.endswith("query.kernel")]
    assert attention and all("tensor" in str(got.specs[n]) for n in attention), got.specs

  if "fsdp" in strategy:
    ways = shape[1] * shape[2]  # the parameters are split fsdp·tensor ways and replicated over 'data'
    assert got.state_most_on_a_device <= 1.2 * got.state_total / ways, (got.state_most_on_a_device, got.state_total)
    if got.compiled_arguments >= 0:  # XLA's own account of what one device holds: the state shard and its batch
      assert got.compiled_arguments - got.batch_per_device <= 1.2 * got.all_state_total / ways


def test_a_large_replicated_parameter_under_fsdp_is_refused_by_name(tmp_path):
  # Rules that leave the toy MLP's 64×32 kernel whole on each of the 8 devices.
  overrides = {"mesh.shape": (1, 8, 1), "sharding.strategy": "fsdp", "sharding.rules": (("embed", None), ("mlp", None)),
               "sharding.min_sharded_size": 1000}
  with pytest.raises(ValueError, match=r"fc1\.kernel with shape \(64, 32\) \(2,048 elements\) is replicated.*fsdp=8"):
    Trainer(toy_config(**overrides), str(tmp_path))
  Trainer(toy_config(**dict(overrides, **{"sharding.min_sharded_size": 0})), str(tmp_path))  # the check is off
  Trainer(toy_config(**dict(overrides, **{"mesh.shape": (8, 1, 1)})), str(tmp_path))  # no fsdp axis to use


def test_the_strategy_is_a_preset_and_rules_override_it():
  cfg = toy_config(**{"sharding.strategy": "fsdp", "sharding.rules": (("norm", None), ("extra", "tensor"))})
  rules = dict(mesh_lib.logical_rules(cfg.sharding))
  assert rules["embed"] == "fsdp" and rules["conv_out"] == "fsdp" and rules["batch"] == ("data", "fsdp")
  assert rules["norm"] is None and rules["extra"] == "tensor"
  assert dict(mesh_lib.logical_rules(toy_config().sharding)) == dict(strategies.STRATEGIES["data"])
  with pytest.raises(ConfigError, match="sharding.strategy 'zero3'"):
    mesh_lib.logical_rules(toy_config(**{"sharding.strategy": "zero3"}).sharding)


def _fit(strategy, logical, shape, mesh_shape=(1, 4, 2)):
  mesh = AbstractMesh(mesh_shape, ("data", "fsdp", "tensor"))
  rules = strategies.resolve_rules(strategy)
  return mesh_lib.fit_spec(mesh_lib.logical_to_mesh(logical, rules), shape, mesh)


def test_fit_spec_puts_each_mesh_axis_on_one_dimension():
  # FSDP: the largest dimension that the fsdp size divides.
  assert _fit("fsdp", ("embed", "embed"), (64, 256)) == P(None, "fsdp")
  assert _fit("fsdp", (None, None, "conv_in", "conv_out"), (3, 3, 320, 4)) == P(None, None, "fsdp", None)
  assert _fit("fsdp", ("embed", "mlp"), (1152, 4608), (1, 256, 1)) == P(None, "fsdp")
  assert _fit("fsdp", ("embed", "heads"), (1152, 1152), (1, 256, 1)) == P(None, None)  # 256 divides neither
  # FSDP × tensor: 'tensor' stays on the heads/MLP dimension, 'fsdp' takes the other; lone dimensions get both.
  assert _fit("fsdp_tensor", ("embed", "heads"), (64, 64)) == P("fsdp", "tensor")
  assert _fit("fsdp_tensor", ("mlp", "embed"), (256, 64)) == P("tensor", "fsdp")
  assert _fit("fsdp_tensor", (None, None, "conv_in", "conv_out"), (3, 3, 8, 16)) == P(None, None, None,
                                                                                       ("fsdp", "tensor"))
  assert _fit("fsdp_tensor", ("norm",), (12,)) == P("fsdp")  # 8 does not divide 12; the prefix 'fsdp' does
  assert _fit("tensor", ("embed", "heads"), (64, 64)) == P(None, "tensor")

"""benchmarks/op_profile.py sorts a traced program's thunk times into the kinds and phases its tables print."""
import os

import jax
import jax.numpy as jnp
import optax

from benchmarks import op_profile


def _step():
  def loss(params, x):
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = conv(jax.nn.silu(conv(x, params["w"])), params["w2"])  # the second one needs an input gradient
    y = y.reshape(-1, 16) @ params["dense"]
    return jnp.mean(jnp.square(y))

  params = {"w": jnp.ones((3, 3, 8, 16)) * 0.1, "w2": jnp.ones((3, 3, 16, 16)) * 0.1, "dense": jnp.ones((16, 4)) * 0.1}
  tx = optax.sgd(0.1)

  def step(params, x):
    grads = jax.grad(loss)(params, x)
    return optax.apply_updates(params, tx.update(grads, tx.init(params))[0])

  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 8))
  return jax.jit(step).lower(params, x).compile(), params, x


def test_a_training_step_is_sorted_into_convolution_directions_and_phases():
  compiled, params, x = _step()
  name, (instrs, comps) = op_profile.parse_module(compiled.as_text())
  kinds = {op_profile.classify(ins, comps) for ins in instrs.values()
           if ins.op in ("fusion", "convolution", "dot")}
  assert {("conv forward", "forward"), ("conv input-grad", "backward"),
          ("conv weight-grad", "backward")} <= kinds, kinds
  assert any(kind == "dense matmuls" and phase == "backward" for kind, phase in kinds), kinds

  jax.block_until_ready(compiled(params, x))
  profile = op_profile.measure(lambda: compiled(params, x), {name: (instrs, comps)}, calls=2)
  assert profile.calls == 2 and profile.wall > 0 and profile.busy > 0
  assert profile.seconds.get(("conv weight-grad", "backward"), 0) > 0
  table = profile.table()
  for row in ("conv forward", "conv weight-grad", "**all**"):
    assert row in table
  assert "cores" in profile.summary() and profile.top_lines(3)


def test_the_dump_that_profile_flags_set_up_is_read_back(tmp_path):
  import subprocess
  import sys
  code = ("from benchmarks import op_profile; op_profile.enable(%r); import jax, jax.numpy as jnp; "
          "jax.jit(lambda x: jnp.tanh(x) @ x)(jnp.ones((8, 8))).block_until_ready()" % str(tmp_path))
  subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  modules = op_profile.parse_modules(str(tmp_path))
  (name,) = [n for n in modules if "lambda" in n]
  instrs, _ = modules[name]
  assert any(i.op in ("dot", "fusion") for i in instrs.values())


def test_an_asynchronous_convolution_lasts_until_its_first_reader_starts():
  """Eigen's convolution thunk returns at launch (diffusion_jax/xla_cpu.py): its time runs to the reader's start,
  looking through a bitcast; a synchronous fusion keeps its own event's duration."""
  text = "\n".join([
      "HloModule m, entry_computation_layout={()->f32[4]}",
      "ENTRY %main (p: f32[4], w: f32[1]) -> f32[4] {",
      "  %p = f32[4]{0} parameter(0)",
      "  %w = f32[1]{0} parameter(1)",
      "  %conv.1 = f32[4]{0} convolution(%p, %w), window={size=1}, dim_labels=b0f_0io->b0f",
      "  %bitcast.2 = f32[4]{0} bitcast(%conv.1)",
      "  %other = f32[4]{0} fusion(%p), kind=kLoop, calls=%c",
      "  ROOT %reader = f32[4]{0} fusion(%bitcast.2, %other), kind=kLoop, calls=%c",
      "}"])
  name, parsed = op_profile.parse_module(text)
  event = lambda op, ts, dur: {"ts": ts, "dur": dur, "args": {"hlo_module": name, "hlo_op": op}}
  events = [event("conv.1", 0.0, 5.0), event("other", 6.0, 10.0), event("reader", 40.0, 2.0),
            event("conv.1", 100.0, 5.0)]  # a second launch whose reader never ran keeps its event
  ends = op_profile._async_ends(events, {name: parsed})
  assert ends == {0: 40.0, 3: 105.0}

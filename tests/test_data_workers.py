"""grain worker processes (data.num_workers > 0) die with the process that reads from them, even by SIGKILL."""
import os
import signal
import subprocess
import sys
import textwrap
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A trainer's data side: the pipeline with 2 worker processes, a batch from each read, then idle.
READER = textwrap.dedent("""
    import time
    from absl import flags
    from diffusion_jax.data.pipeline import default_data_config, make_dataset

    if __name__ == "__main__":  # workers are spawned: they import this file again
      flags.FLAGS.mark_as_parsed()
      cfg = default_data_config()
      cfg.update(num_workers=2, image_size=8)
      it = iter(make_dataset(cfg, "train", global_batch_size=4, seed=0))
      next(it), next(it)  # batches alternate between the workers: both are running
      print("ready", flush=True)
      time.sleep(600)
""")


def _children(pid: int) -> list[int]:
  kids = []
  for name in os.listdir("/proc"):
    try:
      with open(f"/proc/{name}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
      continue
    if ppid == pid:
      kids.append(int(name))
  return kids


def _running(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited; only its reaping is pending
  except OSError:
    return False


def test_workers_exit_when_their_parent_is_killed(tmp_path):
  script = tmp_path / "reader.py"
  script.write_text(READER)
  reader = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=dict(os.environ, PYTHONPATH=REPO))
  workers = []
  try:
    assert reader.stdout.readline().strip() == "ready"
    workers = _children(reader.pid)
    assert len(workers) >= 2  # the 2 grain workers (and multiprocessing's resource tracker)
    reader.send_signal(signal.SIGKILL)
    reader.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(map(_running, workers)):
      time.sleep(0.2)
    assert not [pid for pid in workers if _running(pid)]
  finally:
    reader.kill()
    for pid in workers:  # a failing run must not leave them behind either
      try:
        os.kill(pid, signal.SIGKILL)
      except OSError:
        pass

"""MetricWriter.truncate_after: a resumed run's metrics.jsonl holds each step once."""
import json

from diffusion_jax.train.metrics_writer import MetricWriter, read_metrics


def test_truncate_after_drops_later_steps_and_a_line_cut_short(tmp_path):
  writer = MetricWriter(str(tmp_path), tensorboard=False)
  for step in range(1, 7):
    writer.write_scalars(step, {"train/loss": 1.0 / step})
  writer.write_scalars(3, {"eval/loss": 0.5})
  with open(writer.path, "a") as f:
    f.write('{"step": 7, "train/lo')  # killed mid-write
  writer.close()

  resumed = MetricWriter(str(tmp_path), tensorboard=False)
  resumed.truncate_after(3)
  resumed.write_scalars(4, {"train/loss": 0.2})
  resumed.close()
  rows = read_metrics(str(tmp_path))
  assert [(r["step"], sorted(r)) for r in rows] == [
      (1, ["step", "train/loss"]), (2, ["step", "train/loss"]), (3, ["step", "train/loss"]),
      (3, ["eval/loss", "step"]), (4, ["step", "train/loss"])]
  assert rows[-1]["train/loss"] == 0.2


def test_truncate_after_the_last_step_leaves_the_file_alone(tmp_path):
  writer = MetricWriter(str(tmp_path), tensorboard=False)
  writer.write_scalars(2, {"train/loss": 1.0})
  before = open(writer.path).read()
  writer.truncate_after(2)
  assert open(writer.path).read() == before and json.loads(before)["step"] == 2


def test_disabled_writer_touches_nothing(tmp_path):
  MetricWriter(str(tmp_path), tensorboard=False).write_scalars(5, {"a": 1.0})
  before = open(tmp_path / "metrics.jsonl").read()
  MetricWriter(str(tmp_path), enabled=False).truncate_after(0)  # process > 0 of a multi-host run
  assert open(tmp_path / "metrics.jsonl").read() == before

"""What an ahead-of-time compiled step costs: FLOPs from XLA's cost analysis and per-device memory."""
from __future__ import annotations


def compiled_flops(compiled) -> float:
  """FLOPs of one call, or 0 where the backend has no cost analysis.

  XLA counts a loop body once whatever its trip count: for a `lax.scan` program this is one iteration.
  """
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))
  except Exception:  # cost analysis is best-effort on some backends
    return 0.0


def memory_summary(compiled) -> str:
  try:
    m = compiled.memory_analysis()
    mib = 1 / 2**20
    return (f"per-device memory: arguments {m.argument_size_in_bytes * mib:.1f} MiB, outputs "
            f"{m.output_size_in_bytes * mib:.1f} MiB, temporaries {m.temp_size_in_bytes * mib:.1f} MiB")
  except Exception:
    return "memory analysis unavailable"

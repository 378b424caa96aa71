"""FID's InceptionV3 weights (`pt_inception-2015-12-05-6726825d.pth`, the file pytorch-fid and torch-fidelity
download; the same state dict layout in both) into `models.inception.InceptionV3`.

The `.pth` file is a pickle: read it with `allow_pickle=True` (through `torch.load(weights_only=True)`), or convert
it once to safetensors, which needs no torch and runs no code when read:

  python -m diffusion_jax.pretrained.inception pt_inception-2015-12-05-6726825d.pth inception_fid.safetensors
"""
from __future__ import annotations

import argparse

from flax import nnx

from diffusion_jax.models.inception import InceptionV3
from diffusion_jax.pretrained.weights import (WeightsError, arrays_from_pairs, assign, model_arrays, read_file,
                                              save_safetensors)

_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def inception_pairs(names) -> list[tuple[str, str, str]]:
  """(our path, PyTorch key, layout) of every parameter of `InceptionV3`, from our parameter names."""
  pairs = []
  for name in names:
    head, _, leaf = name.rpartition(".")
    if head.endswith(".conv"):
      pairs.append((name, f"{head}.weight", "conv"))
    elif head.endswith(".bn"):
      pairs.append((name, f"{head}.{_BN[leaf]}", "same"))
    else:  # fc
      pairs.append((name, f"{head}.weight" if leaf == "kernel" else f"{head}.bias", "linear" if leaf == "kernel"
                    else "same"))
  return pairs


def read_state(path: str, *, allow_pickle: bool = False) -> dict:
  """The weight file's arrays, without the batch norms' `num_batches_tracked` counters (unused in evaluation)."""
  return {k: v for k, v in read_file(path, allow_pickle=allow_pickle).items() if not k.endswith("num_batches_tracked")}


def load_inception(path: str, *, allow_pickle: bool = False) -> InceptionV3:
  """FID's InceptionV3 with the weights in `path` (safetensors; the `.pth` pickle only with `allow_pickle`)."""
  state = read_state(path, allow_pickle=allow_pickle)
  model = InceptionV3(rngs=nnx.Rngs(0))
  assign(model, arrays_from_pairs(state, inception_pairs(model_arrays(model)), source=path), source=path)
  return model


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description="Convert FID's InceptionV3 .pth (pytorch-fid's download) to "
                                               "safetensors.")
  parser.add_argument("pth", help="pt_inception-2015-12-05-6726825d.pth")
  parser.add_argument("out", help="the .safetensors file to write")
  args = parser.parse_args(argv)
  try:
    state = read_state(args.pth, allow_pickle=True)
    arrays_from_pairs(state, inception_pairs(model_arrays(InceptionV3(rngs=nnx.Rngs(0)))), source=args.pth)  # fits
  except WeightsError as e:
    raise SystemExit(f"error: {e}") from None
  save_safetensors(state, args.out)
  print(f"wrote {len(state)} InceptionV3 arrays to {args.out}")


if __name__ == "__main__":
  main()

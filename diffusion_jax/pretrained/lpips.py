"""LPIPS-VGG weights from the `lpips` package's state dict (`lpips.LPIPS(net='vgg').state_dict()`) into
`models.lpips.LPIPS`.

Make the file once, where the `lpips` package and torchvision's VGG-16 download are available:

  python -m diffusion_jax.pretrained.lpips OUT.safetensors

It holds `net.slice{1..5}.{i}.weight/bias` (torchvision's VGG-16 conv layers, under their `features` index),
`lin{0..4}.model.1.weight` (the learned 1×1 projections; also under `lins.{k}`) and the scaling layer's constants.
"""
from __future__ import annotations

import argparse

import numpy as np
from flax import nnx

from diffusion_jax.models.lpips import LPIPS, SCALE, SHIFT, VGG16_BLOCKS
from diffusion_jax.pretrained.weights import WeightsError, assign, from_torch, read_file, save_safetensors, take

_SLICE_STARTS = (0, 4, 9, 16, 23)  # lpips splits torchvision's vgg16().features at these indices


def _conv_indices():
  """(block, conv within the block, slice number, torchvision features index) of every VGG-16 conv."""
  for b, block in enumerate(VGG16_BLOCKS):
    first = _SLICE_STARTS[b] + (1 if b else 0)  # a max-pool opens every slice but the first
    for c in range(len(block)):
      yield b, c, b + 1, first + 2 * c  # conv, relu, conv, relu, ...


def lpips_arrays(state: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
  state = dict(state)
  arrays = {}
  for b, c, s, i in _conv_indices():
    arrays[f"blocks.{b}.{c}.kernel"] = from_torch(take(state, f"net.slice{s}.{i}.weight", source), "conv")
    arrays[f"blocks.{b}.{c}.bias"] = take(state, f"net.slice{s}.{i}.bias", source)
  for k in range(len(VGG16_BLOCKS)):
    # lpips registers each projection twice (`lin{k}` and the list `lins.{k}`); its state dict holds both names.
    alias = state.pop(f"lins.{k}.model.1.weight", None)
    if alias is not None and f"lin{k}.model.1.weight" not in state:
      state[f"lin{k}.model.1.weight"] = alias
    arrays[f"lins.{k}.kernel"] = from_torch(take(state, f"lin{k}.model.1.weight", source), "conv")
  for name, expected in (("shift", SHIFT), ("scale", SCALE)):
    value = state.pop(f"scaling_layer.{name}", None)
    if value is not None and not np.allclose(np.ravel(value), expected, atol=1e-6):
      raise WeightsError(f"{source}: scaling_layer.{name} is {np.ravel(value).tolist()}, LPIPS uses {list(expected)}")
  if state:
    raise WeightsError(f"{source} has {len(state)} weights LPIPS-VGG does not use, e.g. {sorted(state)[:3]} "
                       "(only net='vgg' is supported)")
  return arrays


def load_lpips(path: str, *, allow_pickle: bool = False) -> LPIPS:
  """The LPIPS-VGG network with the weights in `path` (safetensors; a torch pickle only with `allow_pickle`)."""
  model = LPIPS(rngs=nnx.Rngs(0))
  assign(model, lpips_arrays(read_file(path, allow_pickle=allow_pickle), path), source=path)
  return model


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description="Write lpips.LPIPS(net='vgg')'s weights as safetensors.")
  parser.add_argument("out", help="the .safetensors file to write")
  args = parser.parse_args(argv)
  import lpips  # the reference package: pip install lpips torchvision (downloads torchvision's VGG-16 weights)
  model = lpips.LPIPS(net="vgg", verbose=False)
  save_safetensors({k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}, args.out)
  print(f"wrote {len(model.state_dict())} LPIPS-VGG arrays to {args.out}")


if __name__ == "__main__":
  main()

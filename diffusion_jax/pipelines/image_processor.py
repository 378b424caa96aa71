"""transformers' CLIP/SigLIP image processor (`preprocessor_config.json`) on the host, with PIL: what LLaVA folders
and diffusers' unCLIP image-variation folders (`feature_extractor/`) prescribe for their image towers."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import numpy as np
from PIL import Image

_RESAMPLE = {0: Image.Resampling.NEAREST, 1: Image.Resampling.LANCZOS, 2: Image.Resampling.BILINEAR,
             3: Image.Resampling.BICUBIC, 4: Image.Resampling.BOX, 5: Image.Resampling.HAMMING}


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
  """transformers' CLIP/SigLIP image processing with PIL: resize (shortest edge, or to height×width), centre crop,
  scale to [0, 1], normalise. Output NHWC float32."""
  size: dict
  crop: Optional[dict]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  resample: int = 3
  rescale: float = 1 / 255
  channels: int = 3

  @classmethod
  def from_folder(cls, folder: str) -> "ImageProcessor":
    """The image processor's settings: preprocessor_config.json, or the `image_processor` section of the
    processor_config.json that transformers 5 writes for a whole processor (LlavaProcessor.save_pretrained)."""
    c = None
    for name, section in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
      path = os.path.join(folder, name)
      if os.path.isfile(path):
        with open(path) as f:
          c = json.load(f)
        c = c.get(section) if section else c
        if c:
          break
    if not c:
      raise FileNotFoundError(f"no image processor settings in {folder} (preprocessor_config.json, or "
                              "processor_config.json with an image_processor section)")
    size = c.get("size") if c.get("do_resize", True) else None
    crop = c.get("crop_size") if c.get("do_center_crop", False) else None
    mean = tuple(c.get("image_mean", (0.0, 0.0, 0.0))) if c.get("do_normalize", True) else (0.0,) * 3
    std = tuple(c.get("image_std", (1.0, 1.0, 1.0))) if c.get("do_normalize", True) else (1.0,) * 3
    return cls(size=size or {}, crop=crop, mean=mean, std=std, resample=int(c.get("resample", 3)),
               rescale=float(c.get("rescale_factor", 1 / 255)) if c.get("do_rescale", True) else 1.0)

  def __call__(self, image: Any) -> np.ndarray:
    img = as_pil(image, self.channels)
    if "shortest_edge" in self.size:
      edge = int(self.size["shortest_edge"])
      w, h = img.size
      short, long = (w, h) if w <= h else (h, w)
      new_long = int(edge * long / short)
      img = img.resize((edge, new_long) if w <= h else (new_long, edge), _RESAMPLE[self.resample])
    elif self.size:
      img = img.resize((int(self.size["width"]), int(self.size["height"])), _RESAMPLE[self.resample])
    if self.crop:
      ch, cw = int(self.crop["height"]), int(self.crop["width"])
      w, h = img.size
      top, left = (h - ch) // 2, (w - cw) // 2
      img = img.crop((left, top, left + cw, top + ch))
    x = np.asarray(img, np.float32)
    x = x[..., None] if x.ndim == 2 else x
    return ((x * self.rescale - np.float32(self.mean[:x.shape[-1]])) / np.float32(self.std[:x.shape[-1]])
            ).astype(np.float32)


def as_pil(image: Any, channels: int) -> Image.Image:
  """A PIL image with `channels` channels from a PIL image or an array (uint8, or float in [-1, 1] or [0, 1])."""
  if isinstance(image, Image.Image):
    img = image
  else:
    x = np.asarray(image)
    if x.dtype != np.uint8:
      # Floats in [-1, 1] (this library's convention) or [0, 1].
      x = np.clip((x + 1) * 127.5 if x.min() < 0 else x * 255.0, 0, 255).round().astype(np.uint8)
    img = Image.fromarray(x[..., 0] if x.ndim == 3 and x.shape[-1] == 1 else x)
  return img.convert("RGB" if channels == 3 else "L")

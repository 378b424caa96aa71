"""Loading a diffusers pipeline folder (`save_pretrained`) as our pipeline: Stable Diffusion, or unCLIP (Karlo).

  pipe = pretrained.load_pipeline('path/to/stable-diffusion-v1-5')                    # sampler from scheduler/
  pipe = pretrained.load_pipeline('path/to/stable-diffusion-v1-5', sampler='dpmpp_2m', use_karras_sigmas=True)

The folder holds model_index.json and unet/, vae/, text_encoder/ (transformers CLIPTextModel), tokenizer/
(vocab.json + merges.txt) and scheduler/ (scheduler_config.json). The safety checker and feature extractor, if
present, are not loaded. The sampler is the one that reproduces the scheduler class step for step (see
`diffusion.scheduler_config`); PNDMScheduler, SD 1.x's default, maps to DDIM on the same time steps because its
PLMS method is not implemented. `sampler` replaces the class the way diffusers' `Scheduler.from_config` would.

An UnCLIPPipeline folder (Karlo's layout: text_encoder/ a CLIPTextModelWithProjection, tokenizer/, prior/,
text_proj/, decoder/, super_res_first/, super_res_last/ and their three UnCLIPSchedulers) loads as
`pipelines.unclip.UnCLIPPipeline`; an UnCLIPImageVariationPipeline folder (image_encoder/ and feature_extractor/ in
place of the prior) as the same class in its variation form.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Optional

from diffusion_jax import pretrained
from diffusion_jax.models.clip import CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection
from diffusion_jax.models.prior import PriorTransformer
from diffusion_jax.models.unclip import UnCLIPTextProjModel
from diffusion_jax.models.unet import UNet2DConditionModel, UNet2DModel
from diffusion_jax.models.vae import AutoencoderKL
from diffusion_jax.pipelines.image_processor import ImageProcessor
from diffusion_jax.pipelines.latent_chain import SamplerSettings
from diffusion_jax.pipelines.stable_diffusion import StableDiffusionPipeline
from diffusion_jax.pipelines.unclip import UnCLIPPipeline
from diffusion_jax.pretrained.weights import WeightsError
from diffusion_jax.tokenizer import CLIPTokenizer

SUPPORTED_PIPELINES = ('StableDiffusionPipeline', 'StableDiffusionImg2ImgPipeline', 'StableDiffusionInpaintPipeline',
                       'UnCLIPPipeline', 'UnCLIPImageVariationPipeline')
_SD = ('text_encoder', 'tokenizer', 'unet', 'vae', 'scheduler')
_UNCLIP = ('text_encoder', 'tokenizer', 'text_proj', 'decoder', 'super_res_first', 'super_res_last',
           'decoder_scheduler', 'super_res_scheduler')
_COMPONENTS = {'StableDiffusionPipeline': _SD, 'UnCLIPPipeline': _UNCLIP + ('prior', 'prior_scheduler'),
               'UnCLIPImageVariationPipeline': _UNCLIP + ('image_encoder', 'feature_extractor')}
# component folder -> the NNX class its loader must return
_MODELS = {'text_encoder': CLIPTextModel, 'unet': UNet2DConditionModel, 'vae': AutoencoderKL}
_UNCLIP_MODELS = {'text_encoder': CLIPTextModelWithProjection, 'text_proj': UnCLIPTextProjModel,
                  'decoder': UNet2DConditionModel, 'super_res_first': UNet2DModel, 'super_res_last': UNet2DModel}


def _read_json(path: str, what: str) -> dict:
  if not os.path.isfile(path):
    raise WeightsError(f'no {what} at {path}')
  with open(path, encoding='utf-8') as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise WeightsError(f'{path} is not valid JSON: {e}') from None


def _component(path: str, index: dict, name: str, *markers: str) -> str:
  """The component's folder (holding one of `markers`), or a one-line error naming what is missing."""
  folder = os.path.join(path, name)
  entry = index.get(name)
  if entry is None or (isinstance(entry, list) and None in entry):
    kind = index.get('_class_name')
    needs = ', '.join(_COMPONENTS.get(kind, _COMPONENTS['StableDiffusionPipeline']))
    raise WeightsError(f'{path}: model_index.json has no {name!r} component; a {kind} folder needs {needs}')
  if not any(os.path.isfile(os.path.join(folder, m)) for m in markers):
    raise WeightsError(f'{path}: missing component {name!r} (no {" or ".join(name + "/" + m for m in markers)})')
  return folder


def _load_tokenizer(folder: str) -> CLIPTokenizer:
  """The CLIP tokenizer of a `tokenizer/` folder: vocab.json + merges.txt (hub folders), or tokenizer.json alone.

  transformers 5 saves only the `tokenizers` library's tokenizer.json; its BPE vocabulary and merges are the
  same tables, so they are written out in the classic two-file form `CLIPTokenizer.from_pretrained_folder` reads.
  """
  if os.path.isfile(os.path.join(folder, 'vocab.json')):
    return CLIPTokenizer.from_pretrained_folder(folder)
  model = _read_json(os.path.join(folder, 'tokenizer.json'), 'tokenizer.json').get('model', {})
  if model.get('type') != 'BPE' or 'vocab' not in model or 'merges' not in model:
    raise WeightsError(f'{folder}/tokenizer.json: expected a BPE model with vocab and merges (a CLIP tokenizer)')
  merges = [m if isinstance(m, str) else ' '.join(m) for m in model['merges']]  # "a b" or ["a", "b"]
  with tempfile.TemporaryDirectory() as tmp:
    with open(os.path.join(tmp, 'vocab.json'), 'w', encoding='utf-8') as f:
      json.dump(model['vocab'], f)
    with open(os.path.join(tmp, 'merges.txt'), 'w', encoding='utf-8') as f:
      f.write('#version: 0.2\n' + '\n'.join(merges) + '\n')
    for name in ('tokenizer_config.json', 'special_tokens_map.json'):  # bos/eos/pad tokens
      if os.path.isfile(os.path.join(folder, name)):
        shutil.copy(os.path.join(folder, name), tmp)
    return CLIPTokenizer.from_pretrained_folder(tmp)


def _scheduler(path: str, index: dict, name: str) -> SamplerSettings:
  folder = _component(path, index, name, 'scheduler_config.json')
  config = _read_json(os.path.join(folder, 'scheduler_config.json'), 'scheduler config')
  try:
    return SamplerSettings.from_scheduler_config(config)
  except ValueError as e:
    raise ValueError(f'{folder}: {e}') from None


def _max_length(tokenizer_folder: str, context: int) -> int:
  """The tokenizer's padded length (`model_max_length`), at most the text encoder's positions."""
  max_length = None
  tokenizer_config = os.path.join(tokenizer_folder, 'tokenizer_config.json')
  if os.path.isfile(tokenizer_config):
    max_length = _read_json(tokenizer_config, 'tokenizer config').get('model_max_length')
  if not isinstance(max_length, int) or max_length > context:  # transformers writes a huge int when unset
    max_length = context
  return max_length


def _load_unclip(path: str, index: dict, kind: str, **load_options) -> UnCLIPPipeline:
  """diffusers' UnCLIPPipeline / UnCLIPImageVariationPipeline folder (Karlo's layout) as our `UnCLIPPipeline`."""
  variation = kind == 'UnCLIPImageVariationPipeline'
  expected = dict(_UNCLIP_MODELS, **({'image_encoder': CLIPVisionModelWithProjection} if variation
                                     else {'prior': PriorTransformer}))
  folders = {name: _component(path, index, name, 'config.json') for name in expected}
  tokenizer_folder = _component(path, index, 'tokenizer', 'vocab.json', 'tokenizer.json')
  stages = ('decoder', 'super_res') + (() if variation else ('prior',))
  schedulers = {stage: _scheduler(path, index, f'{stage}_scheduler') for stage in stages}
  preprocess = None
  if variation:
    preprocess = ImageProcessor.from_folder(_component(path, index, 'feature_extractor', 'preprocessor_config.json'))
  models = {}
  for name, cls in expected.items():
    model = pretrained.load(folders[name], **load_options)
    if not isinstance(model, cls):
      raise WeightsError(f'{folders[name]}: expected a {cls.__name__}, found {type(model).__name__}')
    models[name] = model
  sizes = {'decoder': _read_json(os.path.join(folders['decoder'], 'config.json'), 'decoder config')['sample_size'],
           'super_res': _read_json(os.path.join(folders['super_res_first'], 'config.json'),
                                   'super-resolution config')['sample_size']}
  return UnCLIPPipeline(**models, tokenizer=_load_tokenizer(tokenizer_folder), schedulers=schedulers,
                        max_length=_max_length(tokenizer_folder, models['text_encoder'].config.context_length),
                        sizes=sizes, preprocess=preprocess)


def load_pipeline(path: str, *, sampler: Optional[str] = None, allow_pickle: bool = False, dtype: Any = None,
                  attention_impl: Optional[str] = None, **scheduler_overrides: Any) -> StableDiffusionPipeline:
  """Our `StableDiffusionPipeline` with the weights, tokenizer and scheduler of a diffusers folder.

  `sampler` picks another sampler: one of ours ('ddim', 'ddpm', 'dpmpp_2m', 'euler', 'euler_ancestral', 'heun') or
  a diffusers scheduler class name. `scheduler_overrides` are scheduler config fields in diffusers' names (e.g.
  `use_karras_sigmas=True`, `timestep_spacing='trailing'`). `dtype` is the models' compute dtype (parameters
  stay float32); `allow_pickle=True` permits `.bin` weight files when a component has no safetensors.
  """
  if not os.path.isdir(path):
    raise WeightsError(f'no such folder: {path}')
  index = _read_json(os.path.join(path, 'model_index.json'), 'model_index.json (not a diffusers pipeline folder?)')
  kind = index.get('_class_name')
  if kind not in SUPPORTED_PIPELINES:
    raise WeightsError(f'{path}: cannot load pipeline class {kind!r}; supported: {", ".join(SUPPORTED_PIPELINES)}')
  if kind.startswith('UnCLIP'):
    if sampler is not None or scheduler_overrides:
      raise ValueError(f'{path}: an unCLIP pipeline samples with its UnCLIPSchedulers; sampler and scheduler '
                       'overrides apply to Stable Diffusion folders')
    return _load_unclip(path, index, kind, allow_pickle=allow_pickle, dtype=dtype, attention_impl=attention_impl)

  # Every component and the scheduler are checked before any weights are read: a bad folder fails in milliseconds.
  folders = {name: _component(path, index, name, 'config.json') for name in _MODELS}
  tokenizer_folder = _component(path, index, 'tokenizer', 'vocab.json', 'tokenizer.json')
  scheduler_folder = _component(path, index, 'scheduler', 'scheduler_config.json')
  scheduler_config = _read_json(os.path.join(scheduler_folder, 'scheduler_config.json'), 'scheduler config')
  try:
    settings = SamplerSettings.from_scheduler_config(scheduler_config, sampler, **scheduler_overrides)
  except ValueError as e:
    raise ValueError(f'{scheduler_folder}: {e}') from None

  models = {}
  for name, cls in _MODELS.items():
    model = pretrained.load(folders[name], allow_pickle=allow_pickle, dtype=dtype, attention_impl=attention_impl)
    if not isinstance(model, cls):
      raise WeightsError(f'{folders[name]}: expected a {cls.__name__}, found {type(model).__name__}')
    models[name] = model

  tokenizer = _load_tokenizer(tokenizer_folder)
  max_length = _max_length(tokenizer_folder, models['text_encoder'].config.context_length)

  unet_config = _read_json(os.path.join(folders['unet'], 'config.json'), 'U-Net config')
  default_size = unet_config.get('sample_size', 64) * models['vae'].config.downsample_factor
  return StableDiffusionPipeline(models['text_encoder'], models['unet'], models['vae'], tokenizer, settings,
                                 max_length=max_length, default_size=default_size)

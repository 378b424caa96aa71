"""Config files load from any location, and every mistake in one is a one-line ConfigError (config.load_config,
config.check_values, runtime.run's model-config check). The command line's side: tests/test_cli.py."""
import glob
import os

import pytest

from diffusion_jax.config import ConfigError, check_values, load_config, one_line
from diffusion_jax.data.tokenizers import get_tokenizer
from diffusion_jax.train import runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_ARGS = {"mnist_clip.py": ("", "siglip", "tiny"), "mnist_vit.py": ("", "tiny", "finetune", "probe", "probe,tiny"), "mnist_ddpm.py": ("", "tiny", "unconditional", "class"), "mnist_dit.py": ("", "flow", "reflow", "flow,tiny"),
               "mnist_llava.py": ("", "lm", "align", "instruct,tiny"), "emoji_llava.py": ("", "lm", "instruct,tiny"),
               "mnist_unclip.py": ("", "tiny", "prior", "prior,tiny", "ar_prior", "ar_prior,tiny"),
               "mnist_cvae.py": ("", "tiny", "uncond", "gaussian", "denoising", "uncond,gaussian,denoising,tiny"),
               "mnist_gan.py": ("", "tiny", "text", "text,tiny", "dcgan", "dcgan,tiny", "wgan", "wgan,tiny", "wgan_gp",
                                "wgan_gp,tiny", "sngan", "sngan,tiny")}


def _shipped():
  for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
    if not path.endswith("__init__.py"):
      for arg in CONFIG_ARGS.get(os.path.basename(path), ("", "tiny") if "sd_sample" not in path else ("",)):
        yield f"{path}:{arg}" if arg else path


@pytest.mark.parametrize("spec", list(_shipped()), ids=lambda s: os.path.basename(s))
def test_every_shipped_config_loads_by_path_and_passes_the_value_checks(spec):
  config = load_config(spec)
  check_values(config)
  assert config.get("task")


def test_config_with_sibling_import_loads_from_a_copied_folder(tmp_path):
  # A copy of the configs folder anywhere (no `configs` package on sys.path under that name) keeps working.
  for name in ("mnist_ddpm.py", "mnist_ldm.py"):
    (tmp_path / name).write_text(open(os.path.join(REPO, "configs", name)).read())
  config = load_config(f"{tmp_path / 'mnist_ldm.py'}:tiny")
  assert config.latent.scale_examples == 256 and config.task == "text_to_image_diffusion"


@pytest.mark.parametrize("content, spec_suffix, expected", [
    (None, "", "config file not found: {path}"),
    ("def get_config(:\n", "", "{path} line 1: syntax error: invalid syntax"),
    ("import ml_collections\nfrom configs.no_such_module import base_config\n", "",
     "{path} line 2: cannot load: ModuleNotFoundError: No module named 'configs.no_such_module' (config files "
     "import the shared "
     "defaults with `from diffusion_jax.defaults import base_config` and configs in their own folder with "
     "`from . import name`)"),
    ("x = 1\n", "", "{path} has no get_config() function"),
    ("def get_config(arg=''):\n  raise ValueError(f'unknown config argument {arg!r}; use \"\"')\n", ":big",
     "{path}:big: unknown config argument 'big'; use \"\""),
    ("def get_config():\n  return {'a': 1}\n", "", "{path}: get_config() returned dict, not an ml_collections.ConfigDict"),
    ("def get_config():\n  return undefined_name\n", "", "{path}: NameError: name 'undefined_name' is not defined"),
])
def test_config_file_errors_are_one_line(tmp_path, content, spec_suffix, expected):
  path = tmp_path / "my_config.py"
  if content is not None:
    path.write_text(content)
  with pytest.raises(ConfigError) as e:
    load_config(f"{path}{spec_suffix}")
  assert one_line(e.value) == expected.format(path=path)


def test_a_folder_as_config_is_an_error(tmp_path):
  with pytest.raises(ConfigError, match=f"--config {tmp_path} is a folder; give a config file in it"):
    load_config(str(tmp_path))


def test_one_line_keeps_quotes_and_drops_the_config_dump():
  assert one_line(ValueError("unknown config argument 'huge'; use '', 'tiny', 'unconditional' or 'class'")) == (
      "unknown config argument 'huge'; use '', 'tiny', 'unconditional' or 'class'")
  assert one_line(KeyError("no key 'x'")) == "no key 'x'"  # str(KeyError) would add a pair of quotes
  assert one_line('Key "b" does not exist. Other fields present: "{a: 1,\n b: 2}"') == 'Key "b" does not exist.'


@pytest.mark.parametrize("key, value", [("train.batch_size", 0), ("sample.per_prompt", 0), ("data.num_workers", -1),
                                        ("train.checkpoint_every", 0), ("evals.loss.batch_size", -3),
                                        ("evals.digits.every", -2)])
def test_values_below_their_minimum_are_config_errors(key, value):
  config = load_config(os.path.join(REPO, "configs", "mnist_ddpm.py:tiny"))
  *path, field = key.split(".")
  node = config
  for part in path:
    node = node[part]
  node[field] = value
  with pytest.raises(ConfigError) as e:
    check_values(config)
  minimum = {"data.num_workers": 0, "evals.loss.batch_size": 0, "evals.digits.every": -1}.get(key, 1)
  assert str(e.value) == f"{key} must be an integer >= {minimum}, got {value}"


def test_unknown_tokenizer_is_a_config_error():
  with pytest.raises(ConfigError, match=r"^unknown data.tokenizer 'nope'; expected one of "
                     r"\['bytes', 'clip', 'emoji_chat', 'mnist_chat', 'words'\] or a folder with a tokenizer.json$"):
    get_tokenizer("nope")


def test_model_config_rejecting_a_value_is_a_config_error(tmp_path):
  # U-Net levels come from block_out_channels; attention_levels keeps 2 entries: the model config rejects it while
  # the Trainer builds the model, before anything is compiled.
  config = load_config(os.path.join(REPO, "configs", "mnist_ddpm.py:tiny"))
  config.model.block_out_channels = (8, 16, 32)
  config.mesh.shape = (1, 1, 1)
  with pytest.raises(ConfigError, match=r"^invalid model settings: attention_levels has 2 entries for 3 levels$"):
    runtime.run(config, str(tmp_path), "train")

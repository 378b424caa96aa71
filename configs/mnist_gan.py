"""GANs on bundled MNIST (diffusion_jax/tasks/gan.py): class- or caption-conditional, judged by the independent digit
classifier (eval/digit_accuracy, 50 samples per digit).

  python -m diffusion_jax.main --config configs/mnist_gan.py --workdir /tmp/mnist_gan
  python -m diffusion_jax.main --config configs/mnist_gan.py --workdir /tmp/mnist_gan --mode sample \\
      --config.sample.classes="(3, 7)" --config.sample.truncation=1.0    # 8 truncated samples each of 3 and 7
  python -m diffusion_jax.main --config configs/mnist_gan.py --workdir /tmp/mnist_gan --mode sample \\
      --config.sample.interpolate=10                                     # 10 slerp strips between random latents
  python -m diffusion_jax.main --config configs/mnist_gan.py:text --workdir /tmp/mnist_gan_text \\
      --config.text.clip_workdir=/tmp/mnist_clip                         # a finished configs/mnist_clip.py run

The default is a class-conditional DCGAN at 28 px: a generator with conditional BatchNorm (a condition concatenated to
z made it draw one image per class), a projection discriminator without BatchNorm and a 256-wide hidden layer, the
hinge loss, Adam(4e-4, β1 = 0.5) for both players, EMA of the generator. Measured on the idle 2-core CPU
(2026-12-04, whole commands, README "VAE, GANs and diffusion on one judge"): 97.8% digit accuracy, domain Fréchet
distance 7.15 and the real digits' diversity (15.07 vs 15.12) after the 2,500 steps, in 3 min 51 s.
Other variants by argument, each optionally with ',tiny' (a seconds-long run for the tests, e.g. `:text,tiny`):
  :text     caption-conditional (GAN-INT-CLS): both players take the caption's embedding by the frozen text tower of
            a finished CLIP run; the discriminator is matching-aware. With a configs/mnist_clip.py run: 99.4%, Fréchet
            8.50, diversity 13.88 after 2,500 steps, 4 min 14 s.
  :dcgan    the classic conditional DCGAN: BatchNorm in both players, concatenated condition, non-saturating loss.
            100.0% but collapsed: Fréchet 125.6, diversity 1.87 (every sample of a digit alike), 4 min 15 s.
  :wgan     WGAN: weight clipping at 0.01, RMSProp 5e-5, 5 critic steps per generator step (not measured at length)
  :wgan_gp  WGAN-GP: gradient penalty λ = 10, Adam(1e-4, β1 = 0, β2 = 0.9), 5 critic steps, 1,200 generator steps:
            81.2%, Fréchet 51.0, diversity 16.1 (noisy strokes), 14 min 35 s.
  :sngan    SNGAN-style at 32 px: ResNet players (conditional BatchNorm in G), spectral norm and projection in the
            discriminator, hinge loss, 1,600 steps: 99.4%, Fréchet 44.1, diversity 10.4 (0.69× real), 12 min 42 s.
"""
import ml_collections

from diffusion_jax.defaults import base_config, evaluator, optimizer

from . import mnist_clip

VARIANTS = ("", "text", "dcgan", "wgan", "wgan_gp", "sngan")


def adam(lr: float, b1: float, b2: float) -> dict:
  """GAN optimizer settings: constant rate, no warm-up, no gradient clipping."""
  return dict(name="adamw", lr=lr, b1=b1, b2=b2, schedule="constant", warmup_steps=0, grad_clip=0.0,
              weight_decay=0.0)


def base() -> ml_collections.ConfigDict:
  """Every option of the GAN task, at the default variant's values."""
  c = base_config()
  c.task = "gan"
  c.model = ml_collections.ConfigDict(dict(
      architecture="dcgan", z_dim=64, g_channels=(64, 32), d_channels=(32, 64), d_hidden=256, cond_dim=32,
      g_batch_norm=True, g_conditioning="batch_norm", d_batch_norm=False, spectral_norm=False))
  c.gan = ml_collections.ConfigDict(dict(
      loss="hinge", n_critic=1, condition="class", conditioning="projection",
      gp_weight=10.0, r1_gamma=0.0, matching_aware=False))
  c.text = ml_collections.ConfigDict(dict(clip_workdir=""))  # gan.condition='text': a finished contrastive run
  c.optim.update(adam(4e-4, 0.5, 0.999))  # the generator's
  c.disc_optim = optimizer(**adam(4e-4, 0.5, 0.999))
  c.ema.update(decay=0.999, updates=("generator",))
  c.sample = ml_collections.ConfigDict(dict(
      prompts=(), classes=(), per_prompt=8, seed=0, batch_size=100, template="", truncation=0.0, interpolate=0))
  c.evals.digits = evaluator("digit_accuracy", per_class=50)
  c.data.image_size = 28
  c.train.update(steps=2500, batch_size=64, log_every=100, checkpoint_every=500)
  return c


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  variant, _, size = arg.partition(",")
  if variant == "tiny" and not size:
    variant, size = "", "tiny"
  if variant not in VARIANTS or size not in ("", "tiny"):
    raise ValueError(f"unknown config argument {arg!r}; use one of {VARIANTS}, each optionally with ',tiny'")
  c = base()
  critic_steps = 1
  if variant == "text":
    c.gan.update(condition="text", matching_aware=True)
    # The CLIP run's captions and tokenization (configs/mnist_clip.py); the text tower checks them.
    c.data.update(caption_templates=mnist_clip.TEMPLATES, tokenizer="words", max_text_len=16)
  elif variant == "dcgan":
    c.model.update(d_batch_norm=True, g_conditioning="concat")
    c.gan.update(loss="non_saturating", conditioning="concat")
  elif variant == "wgan":
    c.gan.update(loss="wgan", n_critic=5)
    c.optim.update(name="rmsprop", lr=5e-5, b1=0.0, b2=0.9, eps=1e-8)
    c.disc_optim.update(name="rmsprop", lr=5e-5, b1=0.0, b2=0.9, eps=1e-8, clip_weights=0.01)
  elif variant == "wgan_gp":
    c.gan.update(loss="wgan_gp", n_critic=5)
    c.train.steps = 1200  # five critic steps and the penalty's second derivative: 1.5 steps/s on this CPU
    c.optim.update(adam(1e-4, 0.0, 0.9))
    c.disc_optim.update(adam(1e-4, 0.0, 0.9))
  elif variant == "sngan":
    c.data.image_size = 32
    # Narrower than SNGAN's ResNet and one critic step instead of five: at 64 channels and 5 critic steps a step costs
    # 169 GFLOP, about 4 s on this CPU. The default's Adam(4e-4, β1 = 0.5) for both players; SAGAN's two time
    # scales (1e-4 / 4e-4, β1 = 0) reached 40% digit accuracy in the same 1,600 steps.
    c.model.update(architecture="resnet", g_channels=(64, 32, 32), d_channels=(32, 32, 32, 32), spectral_norm=True)
    c.gan.update(loss="hinge", n_critic=1)
    c.train.steps = 1600  # 30 GFLOP a step, 2 steps/s on this CPU
  critic_steps = int(c.gan.n_critic)
  if critic_steps > 1:  # each critic step takes its own 32 rows; the generator step takes them all
    c.train.batch_size = 32 * critic_steps
  if size == "tiny":
    c.data.image_size = 16
    c.model.update(z_dim=8, cond_dim=8, d_hidden=16, g_channels=(16, 8) if variant != "sngan" else (8, 8),
                   d_channels=(8, 16) if variant != "sngan" else (8, 8, 8))
    c.train.update(steps=4, batch_size=8 * critic_steps, log_every=2, checkpoint_every=2, progress_bar=False,
                   eval_at_end=False, sample_at_end=False)
    c.sample.update(per_prompt=1, batch_size=10)
    c.evals.digits.update(every=-1, per_class=2)
  return c

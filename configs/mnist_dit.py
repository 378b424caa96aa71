"""Class-conditional DiT on bundled MNIST pixels (no text tower): DDPM (v-prediction) or rectified flow, on a
2-core CPU.

  python -m diffusion_jax.main --config configs/mnist_dit.py --workdir /tmp/mnist_dit            # v, DPM++ 2M
  python -m diffusion_jax.main --config configs/mnist_dit.py:flow --workdir /tmp/mnist_dit_flow  # flow, Euler
  python -m diffusion_jax.main --config configs/mnist_dit.py:reflow --workdir /tmp/mnist_dit_reflow \
      --config.flow.reflow.teacher_workdir=/tmp/mnist_dit_flow                               # 2-step reflow

Arguments (comma-separated): '', 'flow' or 'reflow' picks the objective; 'tiny' shrinks everything to a seconds-long
run for the tests ('tiny', 'flow,tiny', 'reflow,tiny'). The end-of-run eval reports eval/digit_accuracy: the share of
class-conditional samples (guided) that an independent MNIST classifier labels as the requested digit.
"""
import ml_collections

from diffusion_jax.defaults import diffusion_config, tiny_diffusion_run


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = set(filter(None, arg.split(",")))
  unknown = args - {"flow", "reflow", "tiny"}
  if unknown:
    raise ValueError(f"unknown config argument(s) {sorted(unknown)}; use '', 'flow' or 'reflow', optionally with "
                     "',tiny'")
  c = diffusion_config()
  c.task = "diffusion"

  # 28 px with 4x4 patches: 49 tokens, cheap enough for a CPU (17 GFLOP per step of 64); MNIST strokes survive the
  # coarse grid because each token predicts its whole 4x4 patch. The non-zero sizes override the variant's.
  c.model.update(denoiser="dit", conditioners=("class",), num_classes=10, variant="small/4", patch_size=4,
                 hidden_size=128, depth=4, num_heads=4, mlp_ratio=4.0)
  c.diffusion.update(
      # v, not ε: the ε model's samples stayed noise (14.6% after 2,400 steps, any sampler), as ε with the cosine
      # schedule amplifies its error by 1/sqrt(alpha_bar) near t = T.
      prediction_type="v_prediction",
      # Training steps drawn logit-normally around t = T/2 (SNR ≈ 1), as the flow objective does: uniform t
      # reached 84.6% digit accuracy, Min-SNR-5 weighting (snr_gamma=5) 49.4%, both after 2,400 steps.
      time_sampling="logit_normal")
  c.flow.reflow.update(num_pairs=4000, teacher_steps=20, guidance_scale=3.0)
  # Karras sigmas: 93.5–96.5% at 5–10 steps on the default run, where plain DPM++ needs 20 (README table).
  c.sample.update(sampler="dpmpp_2m", num_steps=20, use_karras_sigmas=True, guidance_scale=3.0)

  c.data.image_size = 28
  c.data.tokenizer = "words"  # tokens are made but unused: the model reads only the label
  c.data.max_text_len = 16
  c.ema.decay = 0.999
  c.train.update(steps=2400, batch_size=64, log_every=100, checkpoint_every=500,
                 eval_every=0, sample_every=0)  # evaluation and sampling run at the end
  c.optim.update(lr=1e-3, warmup_steps=200)

  if args & {"flow", "reflow"}:
    c.diffusion.objective = "flow"
    c.sample.sampler = "flow_euler"
  if "reflow" in args:
    # Fine-tunes the teacher on its own guided samples (set flow.reflow.teacher_workdir); the guidance is in the
    # pairs, so the reflowed model samples unguided, in a few Euler steps.
    c.task = "reflow"
    c.train.update(steps=1500)
    c.optim.update(lr=3e-4, warmup_steps=50)
    c.ema.decay = 0.995
    c.sample.update(num_steps=2, guidance_scale=1.0)

  if "tiny" in args:
    c.model.update(variant="tiny/4", patch_size=0, hidden_size=0, depth=0, num_heads=0)
    c.data.image_size = 16
    c.flow.reflow.update(num_pairs=16, teacher_steps=2)
    tiny_diffusion_run(c)
  return c

"""Autoregressive decoding of token sequences (captions, DALL-E 1 image tokens): `sampler.Sampler`."""

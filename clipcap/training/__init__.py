"""Training-side library: dataset readers, the CLIP feature cache, the training loop, caption metrics
and evaluation, int8 agreement, the tiny-CLIP pretraining and the synthetic shapes generator.

The scripts under training/ are thin wrappers over these modules; benchmarks reuse `metrics`.
"""

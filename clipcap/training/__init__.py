"""Training-side library: dataset readers, the CLIP feature cache, the training loop and caption metrics.

The scripts under training/ are thin wrappers over these modules; benchmarks reuse `metrics`.
"""

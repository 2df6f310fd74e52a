"""Contrastive pretraining of a tiny open_clip CLIP on synthetic shapes.

The model is ``open_clip.model.CLIP(**cfg)`` with cfg read from a JSON file
(the demo's: training/configs/shapes-clip.json). Plain contrastive training learns which
objects are in an image but not where they are, so the batches add hard
negative captions (relation flipped, objects swapped, other size) and mask
captions that are also correct for another image in the batch. The hard
negatives only teach relations to a tower that can read positions: the
config's fixed 2-D sin-cos positional embedding gives it that (learned
positional embeddings left relations at chance; see the demo model card).

Images become model input through clipcap.images.preprocess, the captioner's
own preprocessing, so the tower is trained on what it is later given.

Outputs in `out`: open_clip_config.json (the CLIP(**cfg) dict),
preprocess_cfg.json, clip.safetensors, clip_visual.safetensors, metrics.json
and loss.png. The script is training/pretrain_clip.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from tqdm import tqdm

from clipcap.images import preprocess as preprocess_images
from clipcap.training import shapes

# Fixed so that held-out metrics are comparable across training seeds.
EVAL_SEED = 1_000_003


@dataclass
class PreprocessConfig:
    """How images become model input: clipcap.images.preprocess's settings.

    open_clip's CLIP() takes no preprocessing arguments, so this lives apart
    from the model cfg and is written to preprocess_cfg.json (read by
    training/extract_features.py into the bundle's `clip` section).
    interpolation and resize_mode record what clipcap.images does (shorter side
    to image_size, bicubic, centre crop), which is also
    ``open_clip.transform.image_transform(image_size, is_train=False)``.
    """

    image_size: int
    mean: tuple[float, ...] = open_clip.constants.OPENAI_DATASET_MEAN
    std: tuple[float, ...] = open_clip.constants.OPENAI_DATASET_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"


@dataclass
class ClipPretrainConfig:
    out: Path  # the output directory (created)
    model_config: Path  # open_clip CLIP(**cfg) JSON
    steps: int = 2000  # optimiser steps
    batch_size: int = 128  # images per step (texts: as many positives, plus their hard negatives)
    lr: float = 5e-4  # peak AdamW learning rate
    weight_decay: float = 0.1  # on weights with two or more dims only
    warmup_steps: int = 100  # linear warmup, then cosine decay to zero
    seed: int = 0  # model init, the training images and the batches
    hard_negatives: bool = True  # add relation-flipped / objects-swapped / other-size captions
    n_images: int = 20000  # training images, generated once and kept in memory
    n_eval: int = 1024  # held-out images for metrics.json
    log_every: int = 10  # steps per loss-log entry
    threads: int = 2  # torch CPU threads


def preprocess(images: list[Image.Image], pre: PreprocessConfig) -> torch.Tensor:
    """Model input for a list of PIL images: clipcap.images.preprocess, as the captioner does it."""
    return torch.from_numpy(preprocess_images(images, pre.image_size, list(pre.mean), list(pre.std)))


def resize_uint8(image: Image.Image, size: int) -> np.ndarray:
    """(3, size, size) uint8: the image cropped and resized as clipcap.images.preprocess does it.

    With mean 0 and std 1/255 its normalisation returns the 8-bit pixels of its resize, so
    rounding recovers them exactly; the pool keeps them at a quarter of float32's memory.
    """
    pixels = preprocess_images([image], size, [0.0, 0.0, 0.0], [1 / 255] * 3)[0]
    return pixels.round().astype(np.uint8)


def normalize(pixels: torch.Tensor, pre: PreprocessConfig) -> torch.Tensor:
    """uint8 (B, 3, S, S) from `resize_uint8` -> model input, by clipcap.images.preprocess (whose
    crop and resize leave an image already S x S unchanged)."""
    return preprocess([Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels], pre)


@dataclass
class Pool:
    """Training images kept resized as uint8 (a 20k pool at 64 px is ~250 MB)."""

    pixels: torch.Tensor
    references: list[list[str]]
    negatives: list[list[str]]


def build_pool(samples: Iterable[shapes.ShapeSample], image_size: int) -> Pool:
    """Consumes ``samples`` one at a time so full-size images never pile up."""
    pixels, references, negatives = [], [], []
    for s in samples:
        pixels.append(resize_uint8(s.image, image_size))
        references.append(s.captions)
        negatives.append(shapes.hard_negatives(s))
    return Pool(torch.from_numpy(np.stack(pixels)), references, negatives)


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W) normalised
    texts: list[str]  # B positives (text i describes image i), then hard negatives
    correct: torch.Tensor  # (B, len(texts)) bool: texts[j] is a reference caption of image i


def build_batch(
    pool: Pool, indices: np.ndarray, rng: np.random.Generator, hard_negatives: bool, pre: PreprocessConfig
) -> Batch:
    refs = [pool.references[i] for i in indices]
    # Both orderings of a two-object caption are correct; drawing one at random
    # teaches the text tower that they mean the same thing.
    texts = [r[int(rng.integers(len(r)))] for r in refs]
    if hard_negatives:
        texts += [neg for i in indices for neg in pool.negatives[i]]
    correct = torch.tensor([[t in r for t in texts] for r in refs])
    return Batch(normalize(pool.pixels[torch.from_numpy(indices)], pre), texts, correct)


class Tokens:
    """Token rows for every caption the grammar can produce, tokenised once."""

    def __init__(self, context_length: int):
        self.captions = shapes.all_captions()
        self.row = {c: i for i, c in enumerate(self.captions)}
        self.table = open_clip.tokenize(self.captions, context_length=context_length)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.table[[self.row[t] for t in texts]]


def contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, correct: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE over B images and T >= B texts, the first B paired with the images.

    Written out rather than using open_clip.loss.ClipLoss: ClipLoss assumes a
    square B x B logit matrix with labels arange(B), so it can neither take the
    extra negative texts (they have no image, hence no text->image row) nor mask
    a caption that is also correct for another image (duplicates are common:
    there are only 36 one-object captions).
    """
    n = image_features.shape[0]
    labels = torch.arange(n)
    other_correct = correct.clone()
    other_correct[labels, labels] = False
    logits = (logit_scale * image_features @ text_features.T).masked_fill(other_correct, float("-inf"))
    image_to_text = F.cross_entropy(logits, labels)
    text_to_image = F.cross_entropy(logits[:, :n].T, labels)
    return (image_to_text + text_to_image) / 2


def lr_at(step: int, cfg: ClipPretrainConfig) -> float:
    """Linear warmup, then cosine decay to zero."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: ClipPretrainConfig) -> torch.optim.Optimizer:
    # As in open_clip's trainer: no weight decay on params with fewer than two
    # dims (gains, biases, class embedding, logit scale). Fixed buffers-as-parameters (a sin-cos
    # positional embedding) have requires_grad off and stay out.
    decay, no_decay = [], []
    for p in (p for p in model.parameters() if p.requires_grad):
        (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)


def _mean(hits: list[bool]) -> float:
    return float(np.mean(hits)) if hits else float("nan")


@torch.no_grad()
def evaluate(
    model: open_clip.model.CLIP, samples: list[shapes.ShapeSample], tokens: Tokens, pre: PreprocessConfig, batch_size: int
) -> dict:
    """Held-out retrieval accuracies (image -> text top-1).

    - batch_top1: among the reference captions present in each held-out batch;
    - all_captions_top1_{one,two}_object: among every caption of the grammar,
      the closest retrieval analogue of exact-match captioning;
    - hard_negative_acc_two_object: canonical caption beats its relation-flipped
      and objects-swapped versions; hard_negative_acc_one_object: beats the
      other size.
    """
    model.eval()
    image_features = torch.cat(
        [model.encode_image(preprocess([s.image for s in samples[i : i + batch_size]], pre), normalize=True)
         for i in range(0, len(samples), batch_size)]
    )
    text_features = model.encode_text(tokens.table, normalize=True)
    scores = image_features @ text_features.T  # (N, all captions)

    batch_hits = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        candidates = sorted({c for s in chunk for c in s.captions})
        cols = [tokens.row[c] for c in candidates]
        best = scores[start : start + len(chunk)][:, cols].argmax(dim=1)
        batch_hits += [candidates[b] in s.captions for b, s in zip(best.tolist(), chunk)]

    best_overall = scores.argmax(dim=1).tolist()
    all_hits = {True: [], False: []}  # keyed by "has two objects"
    neg_hits = {True: [], False: []}
    for i, s in enumerate(samples):
        two = s.relation is not None
        all_hits[two].append(tokens.captions[best_overall[i]] in s.captions)
        negative_scores = scores[i, [tokens.row[c] for c in shapes.hard_negatives(s)]]
        neg_hits[two].append(bool(scores[i, tokens.row[s.caption]] > negative_scores.max()))
    model.train()
    return {
        "n": len(samples),
        "batch_size": batch_size,
        "batch_top1": _mean(batch_hits),
        "all_captions_top1_one_object": _mean(all_hits[False]),
        "all_captions_top1_two_object": _mean(all_hits[True]),
        "hard_negative_acc_one_object": _mean(neg_hits[False]),
        "hard_negative_acc_two_object": _mean(neg_hits[True]),
    }


def plot_loss(log: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in log], [r["loss"] for r in log])
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.set_title("shapes CLIP pretraining")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(cfg: ClipPretrainConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model_cfg = json.loads(cfg.model_config.read_text())
    model = open_clip.model.CLIP(**model_cfg)
    pre = PreprocessConfig(image_size=model.visual.image_size[0])
    tokens = Tokens(model.context_length)

    samples = (shapes.generate_one(cfg.seed, i) for i in tqdm(range(cfg.n_images), desc="generate"))
    pool = build_pool(samples, pre.image_size)
    optimizer = make_optimizer(model, cfg)
    log, window = [], []
    started = time.perf_counter()
    model.train()
    bar = tqdm(range(cfg.steps), desc="pretrain")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = build_batch(pool, rng.choice(cfg.n_images, cfg.batch_size, replace=False), rng, cfg.hard_negatives, pre)
        image_features = model.encode_image(batch.images, normalize=True)
        text_features = model.encode_text(tokens(batch.texts), normalize=True)
        loss = contrastive_loss(image_features, text_features, model.logit_scale.exp(), batch.correct)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            # open_clip clamps the temperature the same way (logit scale <= 100).
            model.logit_scale.clamp_(0, math.log(100))
        window.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            log.append({"step": step + 1, "loss": float(np.mean(window)), "lr": lr_at(step, cfg)})
            window = []
            bar.set_postfix(loss=f"{log[-1]['loss']:.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
    train_seconds = time.perf_counter() - started

    eval_samples = shapes.generate(cfg.n_eval, seed=EVAL_SEED)
    metrics = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()},
        "eval_seed": EVAL_SEED,
        "train_seconds": train_seconds,
        "seconds_per_step": train_seconds / max(1, cfg.steps),
        "logit_scale": model.logit_scale.exp().item(),
        "loss": log,
        "eval": evaluate(model, eval_samples, tokens, pre, cfg.batch_size),
    }

    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "open_clip_config.json").write_text(json.dumps(model_cfg, indent=2) + "\n")
    (cfg.out / "preprocess_cfg.json").write_text(json.dumps(dataclasses.asdict(pre), indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, cfg.out / "clip.safetensors")
    save_file({k: v.contiguous() for k, v in model.visual.state_dict().items()}, cfg.out / "clip_visual.safetensors")
    (cfg.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_loss(log, cfg.out / "loss.png")
    return metrics

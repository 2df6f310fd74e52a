"""The ClipCap training loop: both paper variants, checkpoints that resume exactly, a model bundle at the end.

- `mapper="mlp"`: MLP mapper, GPT-2 fine-tuned with it (the paper's default).
- `mapper="transformer"`: Transformer mapper, GPT-2 frozen: only the mapper is in the optimizer.
- `train_clip=True`: the CLIP image tower is also updated by the caption loss (off in the paper);
  features cannot be cached then, so the tower runs on the images in the loop.

The loss covers caption tokens only: the prefix has no targets and padding is masked out by the
caption mask (not by an ignore index, which would also drop real tokens sharing the pad id).
Every caption ends with the tokenizer's end-of-text, so the model learns to stop.

GPT-2 starts from pretrained `gpt2` (the paper's) unless another model or, by name, `random` is
asked for. The bundle written to `out` is the best epoch's by validation loss (the latest one's
without validation data); checkpoints keep the latest epochs, for resuming.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clipcap.config import BundleError, ClipCapConfig, GPT2Config, MapperConfig, TokenizerConfig
from clipcap.hub import gpt2_folder
from clipcap.images import load_pixels_file
from clipcap.model import ClipCapModel
from clipcap.tokenizer import CaptionTokenizer, train_bpe
from clipcap.training.features import FeatureSet, load_features

RANDOM_GPT2 = "random"  # TrainConfig.gpt2 asking for a randomly initialised GPT-2 of the gpt2_* sizes
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.json"
LOSS_PLOT = "loss.png"


@dataclass
class TrainConfig:
    """Paper defaults (rmokady/CLIP_prefix_caption train.py) wherever the paper has one."""

    features: Path  # a feature directory from extract_features.py
    out: Path  # the model bundle is written here, with metrics.json, loss.png and checkpoints/
    val_features: Path | None = None  # a separate validation feature directory
    val_fraction: float = 0.05  # without val_features: images held out of `features` for validation
    # Model
    mapper: str = "mlp"  # mlp (GPT-2 fine-tuned) | transformer (GPT-2 frozen)
    prefix_length: int = 10
    clip_length: int = 10  # transformer mapper only
    mapper_layers: int = 8  # transformer mapper only
    normalize_prefix: bool = False  # L2-normalise CLIP embeddings before the mapper
    # pretrained GPT-2-family model: hub name (local cache first) or local folder; "random": random
    # init of the gpt2_* sizes below (they apply to it only), with a BPE trained on the captions
    gpt2: str = "gpt2"
    gpt2_layers: int = 12
    gpt2_embd: int = 768
    gpt2_heads: int = 12
    gpt2_positions: int = 1024
    tokenizer: Path | None = None  # tokenizer.json; None: the pretrained model's own, else (random) a BPE of the captions
    bpe_vocab_size: int = 512  # for the BPE trained on the captions
    train_clip: bool = False  # update the CLIP tower with the caption loss
    train_clip_layers: int | None = None  # with train_clip, ViT towers: only the last N blocks (+ final norm,
    # projection) learn; the frozen blocks below need no backward pass, which roughly halves the tower's cost
    # Optimisation
    epochs: int = 10
    batch_size: int = 40
    lr: float = 2e-5
    warmup_steps: int = 5000  # linear warmup, then linear decay to zero at the last step
    weight_decay: float = 0.0  # transformers' AdamW default, which the paper used
    seed: int = 0
    # Machinery
    device: str = "cpu"
    amp: bool = True  # bfloat16 autocast on CUDA; the CPU path is always plain fp32
    threads: int | None = None  # torch CPU threads; None: torch's default
    log_every: int = 20  # steps per logged training-loss point
    keep_checkpoints: int = 2  # newest per-epoch checkpoints kept
    resume: Path | None = None  # a checkpoint to continue from; its training config is used

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        paths = {"features", "out", "val_features", "tokenizer", "resume"}
        data = {**data, "gpt2": data.get("gpt2") or RANDOM_GPT2}  # older checkpoints wrote None for random
        return cls(**{k: Path(v) if k in paths and v is not None else v for k, v in data.items()})


@dataclass
class Examples:
    """Training pairs: row into the embedding table (or image list) and caption token ids (eos included)."""

    rows: list[int]
    tokens: list[list[int]]


@dataclass
class Split:
    features: FeatureSet
    embeddings: torch.Tensor  # (images, embed_dim)
    images: list[str]
    examples: Examples


@dataclass
class TrainResult:
    bundle: Path
    log: dict = field(default_factory=dict)


def caption_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over real caption tokens: (B, T, V) logits, (B, T) targets and 0/1 mask."""
    per_token = F.cross_entropy(logits.float().transpose(1, 2), tokens, reduction="none")  # (B, T)
    return (per_token * mask).sum() / mask.sum()


def pad_batch(token_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad with id 0; the mask, not the id, marks padding."""
    width = max(map(len, token_lists))
    tokens = torch.zeros(len(token_lists), width, dtype=torch.long)
    mask = torch.zeros(len(token_lists), width)
    for i, ids in enumerate(token_lists):
        tokens[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    return tokens, mask


def build_tokenizer(cfg: TrainConfig, captions: list[str], gpt2_dir: str | None) -> CaptionTokenizer:
    """`cfg.tokenizer`; else the pretrained GPT-2's own (from its local folder `gpt2_dir`); else a BPE of the captions."""
    if cfg.tokenizer is not None:
        return CaptionTokenizer.from_file(cfg.tokenizer)
    if gpt2_dir is not None:
        return CaptionTokenizer.from_folder(gpt2_dir)
    return train_bpe(captions, vocab_size=cfg.bpe_vocab_size)


def build_model_config(cfg: TrainConfig, features: FeatureSet, tokenizer: CaptionTokenizer,
                       gpt2_dir: str | None) -> ClipCapConfig:
    from clipcap.model import gpt2_config_from_folder

    if gpt2_dir is not None:
        gpt2 = gpt2_config_from_folder(gpt2_dir)
        if tokenizer.vocab_size > gpt2.vocab_size:
            raise BundleError(f"--gpt2 {gpt2_dir}: its embedding has {gpt2.vocab_size} tokens, the tokenizer "
                              f"{tokenizer.vocab_size}: pass the model's own tokenizer (or none: its folder's)")
    else:
        gpt2 = GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=cfg.gpt2_positions, n_embd=cfg.gpt2_embd,
                          n_layer=cfg.gpt2_layers, n_head=cfg.gpt2_heads)
    mapper = MapperConfig(type=cfg.mapper, prefix_length=cfg.prefix_length, clip_length=cfg.clip_length,
                          num_layers=cfg.mapper_layers)
    return ClipCapConfig(
        clip=features.clip, mapper=mapper, gpt2=gpt2,
        tokenizer=TokenizerConfig(eos_token_id=tokenizer.eos_token_id, stop_token_ids=tokenizer.stop_token_ids()),
        normalize_prefix=cfg.normalize_prefix, train_clip=cfg.train_clip,
        max_tokens=min(ClipCapConfig.max_tokens, gpt2.n_positions - cfg.prefix_length),
    ).validate("training config")


def build_model(cfg: TrainConfig, config: ClipCapConfig, features: FeatureSet, gpt2_dir: str | None) -> ClipCapModel:
    """A fresh model: the feature cache's CLIP tower, a new mapper, GPT-2 pretrained (from `gpt2_dir`) or random."""
    torch.manual_seed(cfg.seed)
    model = ClipCapModel(config)
    model.clip.load_state_dict(features.clip_weights(), strict=True)
    if gpt2_dir is not None:
        from transformers import GPT2LMHeadModel

        model.gpt.load_state_dict(GPT2LMHeadModel.from_pretrained(gpt2_dir, local_files_only=True).state_dict())
    return model


def trainable_parameters(model: ClipCapModel, cfg: TrainConfig) -> list[torch.nn.Parameter]:
    """Mapper always; GPT-2 unless the transformer variant freezes it; CLIP only with train_clip.

    Parameters the architecture itself fixes (open_clip's sin-cos positional embedding) stay fixed.
    """
    fixed = [p for p in model.parameters() if not p.requires_grad]
    model.requires_grad_(False)
    model.clip_project.requires_grad_(True)
    if cfg.mapper != "transformer":
        model.gpt.requires_grad_(True)
    if cfg.train_clip and cfg.train_clip_layers is None:
        model.clip.requires_grad_(True)
    elif cfg.train_clip:
        blocks = getattr(getattr(model.clip, "transformer", None), "resblocks", None)
        if blocks is None or not 0 < cfg.train_clip_layers <= len(blocks):
            raise ValueError(f"train_clip_layers={cfg.train_clip_layers} needs an open_clip ViT tower with at least "
                             "that many blocks")
        for module in [*blocks[-cfg.train_clip_layers:], model.clip.ln_post]:
            module.requires_grad_(True)
        if model.clip.proj is not None:
            model.clip.proj.requires_grad_(True)
    for p in fixed:
        p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def set_train_mode(model: ClipCapModel, cfg: TrainConfig) -> None:
    model.train()
    if cfg.mapper == "transformer":
        model.gpt.eval()  # frozen GPT-2 runs without dropout, as the paper's ClipCaptionPrefix
    if not cfg.train_clip:
        model.clip.eval()


def make_examples(features: FeatureSet, tokenizer: CaptionTokenizer, max_tokens: int) -> Examples:
    rows, tokens = [], []
    for row, record in enumerate(features.records):
        for caption in record.captions:
            ids = tokenizer.encode(caption)[: max_tokens - 1] + [tokenizer.eos_token_id]
            rows.append(row)
            tokens.append(ids)
    return Examples(rows, tokens)


def split_features(cfg: TrainConfig, features: FeatureSet) -> tuple[FeatureSet, FeatureSet | None]:
    """(train, validation): the separate validation set, or `val_fraction` of the images held out."""
    if cfg.val_features is not None:
        return features, load_features(cfg.val_features)
    n_val = int(len(features.records) * cfg.val_fraction)
    if n_val == 0:
        return features, None
    order = torch.randperm(len(features.records), generator=torch.Generator().manual_seed(cfg.seed)).tolist()

    def subset(indices: list[int]) -> FeatureSet:
        indices = sorted(indices)
        return dataclasses.replace(features, records=[features.records[i] for i in indices],
                                   embeddings=features.embeddings[indices])

    return subset(order[n_val:]), subset(order[:n_val])


class Trainer:
    def __init__(self, cfg: TrainConfig):
        if cfg.resume is not None:
            checkpoint = torch.load(cfg.resume, map_location="cpu", weights_only=True)
            saved = TrainConfig.from_dict(checkpoint["train_config"])
            # The schedule, data and model come from the checkpoint; only where it runs may change.
            cfg = dataclasses.replace(saved, out=cfg.out, device=cfg.device, amp=cfg.amp, threads=cfg.threads,
                                      resume=cfg.resume)
        else:
            checkpoint = None
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = torch.device(cfg.device)
        # A hub name resolves to a local folder first: offline, a BundleError naming --gpt2, before any work.
        gpt2_dir = gpt2_folder(cfg.gpt2) if cfg.gpt2 != RANDOM_GPT2 else None
        cfg.out.mkdir(parents=True, exist_ok=True)
        train_features, val_features = split_features(cfg, load_features(cfg.features))
        if checkpoint is not None:
            (cfg.out / "tokenizer.json").write_text(checkpoint["tokenizer_json"], encoding="utf-8")
            self.tokenizer = CaptionTokenizer.from_file(cfg.out / "tokenizer.json")
            self.config = ClipCapConfig.from_dict(checkpoint["model_config"])
        else:
            captions = [c for r in train_features.records for c in r.captions]
            self.tokenizer = build_tokenizer(cfg, captions, gpt2_dir)
            self.config = build_model_config(cfg, train_features, self.tokenizer, gpt2_dir)
        self.model = build_model(cfg, self.config, train_features, gpt2_dir).to(self.device)
        self.train = make_examples(train_features, self.tokenizer, self.config.token_limit)
        self.train_features = train_features
        self.val_features = val_features
        self.val = make_examples(val_features, self.tokenizer, self.config.token_limit) if val_features else None
        self.optimizer = torch.optim.AdamW(trainable_parameters(self.model, cfg), lr=cfg.lr,
                                           weight_decay=cfg.weight_decay)
        self.steps_per_epoch = math.ceil(len(self.train.rows) / cfg.batch_size)
        total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.warmup_steps > total_steps:
            print(f"warning: {cfg.warmup_steps} warm-up steps, longer than the whole run ({total_steps} steps = "
                  f"{cfg.epochs} epochs x {self.steps_per_epoch}): the learning rate never reaches {cfg.lr:g} "
                  f"(it peaks at {cfg.lr * total_steps / cfg.warmup_steps:.3g}); lower --warmup-steps",
                  file=sys.stderr)
        self.scheduler = linear_schedule(self.optimizer, cfg.warmup_steps, total_steps)
        self.epoch, self.step, self.log = 0, 0, {"steps": [], "epochs": []}
        if checkpoint is not None:
            self._restore(checkpoint)

    def _autocast(self):
        if self.device.type == "cuda" and self.cfg.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)  # bf16 needs no loss scaling
        return contextlib.nullcontext()

    def _clip_embeddings(self, features: FeatureSet, rows: list[int]) -> torch.Tensor:
        """(B, embed_dim): cached features, or the tower run on the images when it is being trained."""
        if not self.cfg.train_clip:
            return features.embeddings[rows].to(self.device)
        clip = self.config.clip
        pixels = torch.from_numpy(np.stack([load_pixels_file(features.image_root / features.records[r].image, clip.image_size,
                                               clip.mean, clip.std) for r in rows]))
        return self.model.encode_image(pixels.to(self.device))

    def _batch_loss(self, features: FeatureSet, examples: Examples, indices: list[int]) -> torch.Tensor:
        tokens, mask = pad_batch([examples.tokens[i] for i in indices])
        tokens, mask = tokens.to(self.device), mask.to(self.device)
        with self._autocast():
            prefix = self.model.prefix(self._clip_embeddings(features, [examples.rows[i] for i in indices]))
            logits = self.model(prefix, tokens, mask)
        return caption_loss(logits, tokens, mask)

    @torch.no_grad()
    def validation_loss(self) -> float | None:
        if self.val is None:
            return None
        self.model.eval()
        total, count = 0.0, 0
        for start in range(0, len(self.val.rows), self.cfg.batch_size):
            indices = list(range(start, min(start + self.cfg.batch_size, len(self.val.rows))))
            total += self._batch_loss(self.val_features, self.val, indices).item() * len(indices)
            count += len(indices)
        return total / count

    def fit(self) -> TrainResult:
        from tqdm import tqdm

        from clipcap.formats.model_bundle import save_bundle

        cfg = self.cfg
        for epoch in range(self.epoch, cfg.epochs):
            started, window, epoch_losses = time.perf_counter(), [], []
            set_train_mode(self.model, cfg)
            # The order depends only on (seed, epoch): a resumed run sees the batches a straight run would.
            order = torch.randperm(len(self.train.rows), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
            bar = tqdm(range(self.steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step")
            for batch in bar:
                indices = order[batch * cfg.batch_size: (batch + 1) * cfg.batch_size].tolist()
                loss = self._batch_loss(self.train_features, self.train, indices)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                window.append(loss.item())
                epoch_losses.append(loss.item())
                if len(window) == cfg.log_every or batch == self.steps_per_epoch - 1:
                    self.log["steps"].append({"step": self.step, "epoch": epoch + 1, "loss": sum(window) / len(window),
                                              "lr": self.scheduler.get_last_lr()[0]})
                    bar.set_postfix(loss=f"{self.log['steps'][-1]['loss']:.3f}")
                    window = []
            val_loss = self.validation_loss()
            self.log["epochs"].append({"epoch": epoch + 1, "step": self.step,
                                       "train_loss": sum(epoch_losses) / len(epoch_losses), "val_loss": val_loss,
                                       "seconds": time.perf_counter() - started})
            # The bundle in `out` is the best epoch's so far (the latest without validation): usable mid-run.
            best = min((r["val_loss"] for r in self.log["epochs"] if r["val_loss"] is not None), default=None)
            keep = val_loss is None or val_loss <= best
            tqdm.write(f"epoch {epoch + 1}: train loss {self.log['epochs'][-1]['train_loss']:.4f}"
                       + (f", validation loss {val_loss:.4f}" if val_loss is not None else "")
                       + (f"; bundle written to {cfg.out}" if keep else
                          f"; the bundle stays that of epoch {self.log.get('bundle_epoch', '(earlier)')} (lower validation loss)"))
            self.epoch = epoch + 1
            if keep:
                save_bundle(self.model, self.tokenizer, cfg.out)
                self.log["bundle_epoch"] = epoch + 1
            self._save_checkpoint()
            self._write_log()
        return TrainResult(cfg.out, self.log)

    def _save_checkpoint(self) -> None:
        """Everything a resumed run needs to continue bit for bit: tensors, dicts and plain values only."""
        directory = self.cfg.out / CHECKPOINT_DIR
        directory.mkdir(exist_ok=True)
        self.tokenizer.save(self.cfg.out / "tokenizer.json")
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "epoch": self.epoch,
            "step": self.step,
            "log": self.log,
            "train_config": self.cfg.to_dict(),
            "model_config": self.config.to_dict(),
            "tokenizer_json": (self.cfg.out / "tokenizer.json").read_text(encoding="utf-8"),
        }
        path = directory / f"epoch-{self.epoch:03d}.pt"
        torch.save(state, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)  # never a half-written checkpoint under the real name
        for old in sorted(directory.glob("epoch-*.pt"))[: -self.cfg.keep_checkpoints]:
            old.unlink()

    def _restore(self, checkpoint: dict) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        torch.set_rng_state(checkpoint["rng"])
        if checkpoint["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint["cuda_rng"])
        self.epoch, self.step, self.log = checkpoint["epoch"], checkpoint["step"], checkpoint["log"]

    def _write_log(self) -> None:
        metrics = {"train_config": self.cfg.to_dict(), "steps_per_epoch": self.steps_per_epoch,
                   "train_examples": len(self.train.rows), "val_examples": len(self.val.rows) if self.val else 0,
                   **self.log}
        (self.cfg.out / METRICS_FILE).write_text(json.dumps(metrics, indent=1) + "\n")
        plot_losses(self.log, self.cfg.out / LOSS_PLOT)


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warmup to the base lr over `warmup_steps`, then linear decay to 0 at `total_steps`
    (transformers' get_linear_schedule_with_warmup, as the paper used)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def plot_losses(log: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in log["steps"]], [r["loss"] for r in log["steps"]], label="train (running mean)")
    val = [r for r in log["epochs"] if r["val_loss"] is not None]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation (per epoch)")
    ax.set_xlabel("step")
    ax.set_ylabel("caption cross-entropy")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(cfg: TrainConfig) -> TrainResult:
    return Trainer(cfg).fit()

"""Device parity: one model bundle captioned by the torch runtime on a device and on the CPU reference.

The check a first GPU run makes before any speed work: fp32 greedy and beam tokens on `device` must
equal the CPU's, image by image; the largest prefix difference and the TF32 switches (which change
fp32 rounding on CUDA) are reported beside them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from clipcap_bench.latency import synthetic_images
from clipcap_bench.schema import jsonable


@dataclass
class DeviceParityConfig:
    bundle: Path  # a model bundle (the torch backend runs it)
    device: str = "cuda"  # the device checked against the CPU reference
    images: int = 4  # synthetic images captioned on both devices
    image_size: tuple[int, int] = (320, 240)  # their size (width, height)
    strategies: tuple[str, ...] = ("greedy", "beam")  # fp32 decodings compared token for token
    max_tokens: int | None = None  # None: the bundle's max_tokens
    seed: int = 0  # of the synthetic images


def check_device_parity(config: DeviceParityConfig) -> dict:
    """{"identical": bool, "strategies": {name: {"identical": n, "of": n, "differing": [...]}}, ...}."""
    from clipcap.captioner import Captioner
    from clipcap.decoding import DecodingOptions

    images = synthetic_images(config.images, config.image_size, config.seed)
    reference = Captioner.from_path(config.bundle, backend="torch", device="cpu")
    checked = Captioner.from_path(config.bundle, backend="torch", device=config.device)
    pixels = reference.preprocess(images)
    prefix_diff = (reference.runtime.encode(pixels) - checked.runtime.encode(pixels).cpu()).abs().max()
    strategies = {}
    for strategy in config.strategies:
        options = DecodingOptions(strategy=strategy, max_tokens=config.max_tokens)
        want = reference.caption_pixels(pixels, options).captions
        got = checked.caption_pixels(pixels, options).captions
        differing = [{"image": i, "cpu": a.token_ids, config.device: b.token_ids}
                     for i, (a, b) in enumerate(zip(want, got)) if a.token_ids != b.token_ids]
        strategies[strategy] = {"identical": len(want) - len(differing), "of": len(want), "differing": differing}
    return {
        "settings": jsonable(asdict(config)),
        "identical": all(not s["differing"] for s in strategies.values()),
        "strategies": strategies,
        "prefix_max_abs_diff": float(prefix_diff),
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
    }

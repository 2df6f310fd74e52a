"""Bulk captioning throughput: the local engine vs Ray Data actors, back to back, on generated images.

    python benchmarks/bulk.py models/shapes-demo --images 64 --out benchmarks/results/bulk-demo

Each engine captions N and then 2N generated images (fresh output folders), the engines
alternating (local N, ray N, local 2N, ray 2N), so a machine shared with other work loads both
alike. Images/s is the marginal rate N / (wall(2N) - wall(N)): model loading and Ray's start are
paid by both runs and cancel; the wall times are reported too. Writes bulk.json, bulk.md and
bulk.png to --out and prints the Markdown.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from clipcap.bulk.run import BulkConfig, caption_dataset
from clipcap.decoding import DecodingOptions


def write_images(folder: Path, count: int, size: int, seed: int = 0) -> None:
    """Noisy images of random base colours, `size` x `size` PNG (preprocessing resizes them anyway)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = np.clip(rng.integers(0, 256, 3) + rng.integers(-30, 31, (size, size, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"img{i:05d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--images", type=int, default=64, help="N: the runs caption N and 2N images")
    parser.add_argument("--size", type=int, default=256, help="generated image side in pixels")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=None, help="default: the bundle's")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bulk-bench-"))
    runs = []
    try:
        for count in (args.images, 2 * args.images):
            images = work / f"images-{count}"
            images.mkdir()
            write_images(images, count, args.size)
            for engine in ("local", "ray"):
                out = work / f"out-{engine}-{count}"
                manifest = caption_dataset(BulkConfig(
                    bundle=args.bundle, source=str(images), out=str(out), backend=args.backend,
                    options=DecodingOptions(max_tokens=args.max_tokens), batch_size=args.batch_size,
                    engine=engine, actors=args.actors, progress=False))
                runs.append({"engine": engine, "images": count, **manifest["timings"],
                             "load_average": os.getloadavg()[0]})
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work)

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    lines = [f"bundle `{args.bundle}`, backend {args.backend}, N = {args.images} images of {args.size}px, "
             f"batch {args.batch_size}, max_tokens {args.max_tokens or 'bundle default'}, ray actors {args.actors}, "
             f"cpu count {os.cpu_count()}", "",
             "| engine | images/s (marginal, N more images) | wall s for N / 2N | wall images/s for 2N | 1-min load avg after N / 2N |",
             "|---|---:|---|---:|---|"]
    rates = {}
    for engine in ("local", "ray"):
        small, large = (r for r in runs if r["engine"] == engine)
        extra = large["seconds"] - small["seconds"]
        # 2N no slower than N: the machine's noise exceeded N images' work; no rate can be read.
        rates[engine] = args.images / extra if extra > 0 else float("nan")
        marginal = f"{rates[engine]:.2f}" if extra > 0 else "n/a: 2N ran faster than N (load noise)"
        lines.append(f"| {engine} | {marginal} | {small['seconds']:.1f} / {large['seconds']:.1f} | "
                     f"{large['images_per_second']:.2f} | {small['load_average']:.1f} / {large['load_average']:.1f} |")
    (args.out / "bulk.json").write_text(json.dumps({"settings": settings, "runs": runs}, indent=2) + "\n")
    (args.out / "bulk.md").write_text("\n".join(lines) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 3))
    walls = {r["engine"]: r["images_per_second"] for r in runs if r["images"] == 2 * args.images}
    axes.bar(list(walls), list(walls.values()), color=["tab:blue", "tab:orange"])
    axes.set_ylabel(f"images/s, wall, {2 * args.images} images")
    axes.set_title(f"{Path(args.bundle).name} ({args.backend}): local vs Ray, {args.actors} actors", fontsize=9)
    figure.tight_layout()
    figure.savefig(args.out / "bulk.png", dpi=120)
    plt.close(figure)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""How far a candidate (a quantised or fp16 sibling, or another runtime) moves the captions of a reference (its fp32 source).

`compare_captions` measures greedy agreement of two `Captioner`s and, given references, the
caption-metric delta (clipcap.training.evaluation's scorer); `measure_agreement` runs it on image
files or on a caption dataset.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from clipcap.config import BundleError


@dataclass
class Agreement:
    images: int
    caption_agreement: float  # share of images whose greedy token sequences are identical
    token_agreement: float  # sum of common-prefix lengths / sum of reference lengths
    metrics_fp32: dict[str, float] = field(default_factory=dict)  # with references only
    metrics_candidate: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary_lines(self, candidate: str) -> list[str]:
        """What a script prints: the agreement, each metric of fp32 and `candidate` (a name) with its delta, the notes."""
        lines = [f"greedy captions identical to fp32: {self.caption_agreement:.1%} of {self.images} images; "
                 f"tokens agreeing (common prefix): {self.token_agreement:.1%}"]
        lines += [f"{name:<8} fp32 {self.metrics_fp32[name] * 100:6.2f}  {candidate} {self.metrics_candidate[name] * 100:6.2f}"
                  f"  delta {delta * 100:+6.2f}" for name, delta in self.metric_delta.items()]
        return lines + [f"note: {note}" for note in self.notes]

    @property
    def metric_delta(self) -> dict[str, float]:
        return {k: self.metrics_candidate[k] - v for k, v in self.metrics_fp32.items() if k in self.metrics_candidate}

    def to_dict(self) -> dict:
        return {"images": self.images, "caption_agreement": self.caption_agreement,
                "token_agreement": self.token_agreement, "metrics_fp32": self.metrics_fp32,
                "metrics_candidate": self.metrics_candidate, "metric_delta": self.metric_delta, "notes": self.notes}


def token_agreement(reference: list[list[int]], candidate: list[list[int]]) -> tuple[float, float]:
    """(caption agreement, token agreement) of two lists of token sequences, as in `Agreement`."""
    if len(reference) != len(candidate) or not reference:
        raise ValueError("need two equally long, non-empty lists of token sequences")
    same = sum(r == c for r, c in zip(reference, candidate))
    common = 0
    for r, c in zip(reference, candidate):
        prefix = 0
        while prefix < min(len(r), len(c)) and r[prefix] == c[prefix]:
            prefix += 1
        common += prefix
    return same / len(reference), common / max(1, sum(map(len, reference)))


def compare_captions(reference, candidate, pixels_batches, options=None,
                     references: list[list[str]] | None = None, keys: list[str] | None = None) -> Agreement:
    """Greedy captions of two `Captioner`s over batches of pixels; with `references` (one list of
    reference captions per image, in order), also their caption scores.
    """
    ref_captions, cand_captions = [], []
    for pixels in pixels_batches:
        ref_captions += reference.caption_pixels(pixels, options).captions
        cand_captions += candidate.caption_pixels(pixels, options).captions
    caption_rate, token_rate = token_agreement([c.token_ids for c in ref_captions],
                                               [c.token_ids for c in cand_captions])
    result = Agreement(len(ref_captions), caption_rate, token_rate)
    if references is not None:
        keys = keys or [str(i) for i in range(len(references))]
        try:
            from clipcap.training.evaluation import score_predictions
        except ImportError:  # the training extra is not installed: agreement alone still says a lot
            result.notes.append("caption metrics skipped: clipcap.training.evaluation is not importable")
            return result
        for captions, target in ((ref_captions, result.metrics_fp32), (cand_captions, result.metrics_candidate)):
            rows = [{"image": k, "prediction": c.caption, "references": r} for k, c, r in zip(keys, captions, references)]
            scores, _, notes = score_predictions(rows, spice=False)
            target.update(scores)
    return result


@dataclass
class AgreementConfig:
    reference: Path  # the fp32 export bundle (or a model bundle, with a torch backend)
    candidate: Path  # the quantised or fp16 sibling (or the same model bundle under another backend)
    images: list[Path] = field(default_factory=list)  # image files: agreement only
    data: Path | None = None  # a caption dataset (clipcap.training.data formats): agreement + metric delta
    image_root: Path | None = None  # None: the data file's directory
    limit: int | None = None  # only the first N images of `data`
    batch_size: int = 16
    max_tokens: int | None = None  # None: the bundle's max_tokens
    device: str = "cpu"  # both bundles' device (cuda: an fp16 sibling where it is meant to run)
    backends: tuple[str, str] = ("onnxruntime", "onnxruntime")  # the reference's and the candidate's runtime

    def check_inputs(self) -> None:
        """Exactly one of images / data, every image file present, the device there; raises with the first problem."""
        from clipcap.runtimes import RUNTIMES
        from clipcap.runtimes.onnx_runtime import execution_providers

        unknown = [b for b in self.backends if b not in RUNTIMES]
        if len(self.backends) != 2 or unknown:
            raise BundleError(f"backends: two of {', '.join(RUNTIMES)} (the reference's, the candidate's) expected")
        if "onnxruntime" in self.backends:
            execution_providers(self.device)  # RuntimeUnavailable names what to install
        if bool(self.images) == (self.data is not None):
            raise BundleError("compare on either image files or a caption dataset (exactly one of them)")
        if self.data is not None:
            from clipcap.training.data import read_dataset

            read_dataset(self.data)  # DatasetError names the file and what is wrong with it
        missing = [str(f) for f in self.images if not Path(f).is_file()]
        if missing:
            raise BundleError(f"image file(s) not found: {', '.join(missing[:3])}")


def add_agreement_arguments(parser, device_help: str = "cpu, or cuda[:N]") -> None:
    """The flags a script needs for an `AgreementConfig`'s inputs (--images, --data, --image-root, --limit,
    --max-tokens, --batch-size, --device); `agreement_inputs(args)` reads them back."""
    parser.add_argument("--images", type=Path, nargs="*", default=[], help="images to measure agreement on")
    parser.add_argument("--data", type=Path, help="caption dataset: agreement and BLEU/CIDEr delta")
    parser.add_argument("--image-root", type=Path, help="images of --data (default: its folder)")
    parser.add_argument("--limit", type=int, help="only the first N images of --data")
    parser.add_argument("--max-tokens", type=int, help="default: the reference's max_tokens")
    parser.add_argument("--batch-size", type=int, default=AgreementConfig.batch_size)
    parser.add_argument("--device", default=AgreementConfig.device, help=device_help)


def agreement_inputs(args) -> dict:
    """`AgreementConfig` keyword arguments from the flags `add_agreement_arguments` added."""
    return {"images": args.images, "data": args.data, "image_root": args.image_root, "limit": args.limit,
            "max_tokens": args.max_tokens, "batch_size": args.batch_size, "device": args.device}


def measure_agreement(config: AgreementConfig) -> Agreement:
    """Greedy captions of both bundles (their `config.backends` on `config.device`) on image files or on a caption dataset."""
    import numpy as np
    from tqdm import tqdm

    from clipcap.captioner import Captioner
    from clipcap.decoding import DecodingOptions

    config.check_inputs()
    files, references, keys = list(config.images), None, None
    if config.data is not None:
        from clipcap.training.data import read_dataset

        records = read_dataset(config.data).records[: config.limit]
        root = config.image_root or Path(config.data).parent
        files = [root / r.image for r in records]
        references, keys = [r.captions for r in records], [r.image for r in records]
    reference = Captioner.from_path(config.reference, backend=config.backends[0], device=config.device)
    candidate = Captioner.from_path(config.candidate, backend=config.backends[1], device=config.device)
    options = DecodingOptions(max_tokens=config.max_tokens or reference.config.max_tokens)
    starts = range(0, len(files), config.batch_size)
    batches = (np.stack([reference.load_pixels_file(f) for f in files[start: start + config.batch_size]])
               for start in tqdm(starts, desc="candidate vs fp32", unit="batch"))
    return compare_captions(reference, candidate, batches, options, references, keys)

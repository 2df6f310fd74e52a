"""A small mutation run: realistic one-line bugs planted in the library, one at a time; does a test notice?

    OMP_NUM_THREADS=1 .venv/bin/python scripts/mutation.py             # every mutant (CPU heavy: ~30-60 min)
    .venv/bin/python scripts/mutation.py --list                        # the mutants, no run
    .venv/bin/python scripts/mutation.py --only decoding --only bulk   # mutants whose name contains a word

The checkout is copied to a temporary folder (the files git tracks or would track; `.venv` linked), so
the working tree is never edited: each mutant replaces one line there, runs its module's tests with
`pytest -x` (the copy on PYTHONPATH: it comes before the venv's editable install, which Python
consults after sys.path, in the tests' subprocesses too), and the line is put back. A mutant is caught when the tests
fail (or time out), survives when they pass. Prints one line per mutant, then the survivors and the score.
Each mutant's `old` text must occur exactly once in its file: a mutant that no longer applies is an error,
not a survivor, so the list is kept true as the code changes.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str  # module/what the bug is
    file: str  # relative to the checkout
    old: str  # text that occurs exactly once in `file`
    new: str  # what the bug writes instead
    tests: tuple[str, ...]  # pytest arguments: test files, and -k selections where a file is slow


DECODING = ("tests/test_decoding.py", "tests/test_decoding_loops.py", "tests/test_decoding_numerics.py")
IMAGES = ("tests/test_images.py", "-k", "not fuzzed")  # the fuzzing property alone takes minutes
RUNTIMES = ("tests/runtimes/test_onnx_runtime.py", "tests/runtimes/test_cache_contract.py", "tests/test_decoding.py")
SERVING = ("tests/test_serving.py",)
ENGINE = ("tests/test_engine.py",)
OIP = ("tests/test_serving_front.py",)
BULK = ("tests/test_caption_dataset.py", "-k", "not ray")  # the Ray engine's test needs the ray extra and minutes
FORMATS = ("tests/formats", "tests/export/test_onnx_export.py", "-k", "manifest or bundle or detect or refus")
PARITY = ("tests/export/test_onnx_export.py", "-k", "parity")
CLI = ("tests/test_cli.py", "tests/test_batch_invariance.py", "-k", "cli")  # the latter: seeds across batches

MUTANTS = [
    # decoding
    Mutant("decoding: beam search ignores the temperature", "clipcap/decoding.py",
           "arrays.log_softmax(scaled_logits(logits, self.temperature))",
           "arrays.log_softmax(scaled_logits(logits, 1.0))", DECODING),
    Mutant("decoding: beam scores not length-normalised", "clipcap/decoding.py",
           "average = (self.scores[:, None] + logprobs) / lengths[:, None]  # (K, V)",
           "average = self.scores[:, None] + logprobs  # (K, V)", DECODING),
    Mutant("decoding: top-p keeps one token too many", "clipcap/decoding.py",
           "drop_sorted = (xp.cumulative_sum(probs, axis=-1) - probs) >= self.top_p",
           "drop_sorted = (xp.cumulative_sum(probs, axis=-1) - probs) > self.top_p", DECODING),
    Mutant("decoding: one token short of max_tokens", "clipcap/decoding.py",
           "self.done = len(self.tokens) == self.max_tokens or token in self.stop_ids",
           "self.done = len(self.tokens) == self.max_tokens - 1 or token in self.stop_ids", DECODING),
    Mutant("decoding: only the first stop token stops a row", "clipcap/decoding.py",
           "self.stop_ids = set(stop)", "self.stop_ids = set(stop[:1])", DECODING),
    Mutant("decoding: nucleus sampling ignores its generator", "clipcap/decoding.py",
           "cumulative <= self.generator.random() * cumulative[-1]", "cumulative <= 0.5 * cumulative[-1]", DECODING),
    Mutant("decoding: every row samples with the same seed", "clipcap/decoding.py",
           "return [base + row for row in range(batch_size)]", "return [base for row in range(batch_size)]", DECODING),
    Mutant("decoding: logits scaled without subtracting the maximum", "clipcap/decoding.py",
           "return (logits - xp.max(logits, axis=-1, keepdims=True)) / temperature", "return logits / temperature",
           DECODING),
    Mutant("decoding options: beam_size at its documented maximum refused", "clipcap/decoding_options.py",
           "1 <= self.beam_size <= self.MAX_BEAM_SIZE", "1 <= self.beam_size < self.MAX_BEAM_SIZE", DECODING),
    Mutant("decoding options: an option the strategy ignores accepted", "clipcap/decoding_options.py",
           "if users is not None and strategy not in users:", "if users is not None and strategy not in STRATEGIES:",
           DECODING + CLI),
    # images
    Mutant("images: a refused plugin may parse the header", "clipcap/images.py",
           "image = Image.open(io.BytesIO(data), formats=list(dict.fromkeys(fmt.opener for fmt in accepted)))",
           "image = Image.open(io.BytesIO(data))", IMAGES),
    Mutant("images: pixel limit off by one", "clipcap/images.py",
           "if width * height > max_pixels:", "if width * height >= max_pixels:", IMAGES),
    Mutant("images: 16-bit samples truncated, not rounded", "clipcap/images.py",
           "image = Image.fromarray(((samples + 128) // 257).astype(np.uint8), \"L\")  # round(v / 257)",
           "image = Image.fromarray((samples // 257).astype(np.uint8), \"L\")  # round(v / 257)", IMAGES),
    Mutant("images: transparency composited over black", "clipcap/images.py",
           "rgb = (rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255",
           "rgb = (rgba[..., :3] * alpha + 127) // 255", IMAGES),
    Mutant("images: EXIF orientation ignored", "clipcap/images.py",
           "return Decoded(image, (0.0, 0.0, width, height), orientation if orientation in UPRIGHT else 1)",
           "return Decoded(image, (0.0, 0.0, width, height), 1)", IMAGES),
    Mutant("images: format names not case-folded", "clipcap/image_formats.py",
           "names = tuple(str(name).upper() for name in names)", "names = tuple(str(name) for name in names)",
           IMAGES),
    # runtimes
    Mutant("onnx runtime: positions restart at 0 after the prefix", "clipcap/runtimes/onnx_runtime.py",
           "positions = cache.lengths[:, None] + xp.arange(length, dtype=xp.int64, device=runtime.device)",
           "positions = xp.broadcast_to(xp.arange(length, dtype=xp.int64, device=runtime.device)[None], (batch, length))",
           RUNTIMES),
    Mutant("onnx runtime: a grown cache loses its past", "clipcap/runtimes/onnx_runtime.py",
           "bigger[:, :, :used] = buffer[:, :, :used]", "bigger[:, :, :used] = 0", RUNTIMES),
    Mutant("padding: a padded cache's select keeps every row", "clipcap/runtimes/padding.py",
           "selected = [xp.take(t, index, axis=0) for t in tensors]",
           "selected = list(tensors)", RUNTIMES),
    Mutant("torch runtime: positions restart at 0 after the prefix", "clipcap/runtimes/padding.py",
           "xp.arange(past, past + length, dtype=xp.int64, device=device)",
           "xp.arange(0, length, dtype=xp.int64, device=device)", RUNTIMES),
    Mutant("padding: a joined row's position ignores its padding", "clipcap/runtimes/padding.py",
           "return mask, positions - pads[:, None]", "return mask, positions", ("tests/test_continuous_batching.py",)),
    # serving
    Mutant("serving: body limit off by one", "clipcap/serving/service.py",
           "if size > self.config.max_body_bytes:", "if size >= self.config.max_body_bytes:", SERVING),
    Mutant("serving: JSON body limit without base64 growth", "clipcap/serving/service.py",
           "largest = 4 * -(-self.config.max_body_bytes // 3) + self.config.max_options_bytes + 64",
           "largest = self.config.max_body_bytes + self.config.max_options_bytes + 64", SERVING),
    Mutant("engine: a seeded nucleus request samples with a random seed", "clipcap/serving/engine.py",
           "return new_sequence(options, stop, max_tokens, options.seed)",
           "return new_sequence(options, stop, max_tokens, None)", SERVING),
    Mutant("engine: a failed shared step fails every request in it", "clipcap/serving/engine.py",
           "            if entry.tokens or handle.done:", "            if True:", ENGINE),
    Mutant("engine: a cancelled request keeps its rows", "clipcap/serving/engine.py",
           "leaving = [entry for entry in self._running.values() if self._ended(entry.handle)]",
           "leaving = []", ENGINE),
    Mutant("engine: a full queue admits one more", "clipcap/serving/engine.py",
           "if queued >= self.config.max_queued:", "if queued > self.config.max_queued:", ENGINE),
    Mutant("engine: a beam request takes one row", "clipcap/serving/engine.py",
           "return options.beam_size if options.strategy == \"beam\" else 1", "return 1", ENGINE),
    Mutant("serving: a repeated part accepted", "clipcap/serving/service.py",
           "repeated = [name for name, count in Counter(part.name for part in form.parts).items() if count > 1]",
           "repeated = [name for name, count in Counter(part.name for part in form.parts).items() if count > 2]",
           SERVING),
    Mutant("serving: warm-up skips a batchSize that is no power of two", "clipcap/serving/service.py",
           "return sizes + ([max_batch_size] if max_batch_size > sizes[-1] else [])", "return sizes", SERVING),
    Mutant("quoting: quote_names shows every name", "clipcap/quoting.py",
           "shown = \", \".join(quote(name) for name in names[:QUOTE_NAMES])",
           "shown = \", \".join(quote(name) for name in names)", ("tests/test_quoting.py",) + SERVING),
    # oip
    Mutant("oip: binary_data_output ignored", "clipcap/serving/oip.py",
           "parameters.get(\"binary_data_output\") is True)", "parameters.get(\"binary_output\") is True)", OIP),
    Mutant("oip: image count limit off by one", "clipcap/serving/oip.py",
           "if count > max_images:", "if count >= max_images:", OIP),
    Mutant("oip: a header length past the body accepted", "clipcap/serving/oip.py",
           "if not 0 <= length <= len(body):", "if not 0 <= length:", OIP),
    # bulk
    Mutant("bulk: resume keyed on path instead of id", "clipcap/bulk/run.py",
           "pending = [ref for ref in refs if ref.id not in done]",
           "pending = [ref for ref in refs if ref.path not in done]", BULK),
    Mutant("bulk: the folder walk keeps the old five extensions", "clipcap/bulk/sources.py",
           "images = [p for p in files if p.suffix.lower() in endings]",
           "images = [p for p in files if p.suffix.lower() in (\".jpg\", \".jpeg\", \".png\", \".webp\", \".bmp\")]",
           BULK),
    Mutant("bulk: a path listed twice keeps its last entry", "clipcap/bulk/sources.py",
           "seen.setdefault(ref.id, ref)", "seen[ref.id] = ref", BULK),
    Mutant("bulk: a shard one row over its size", "clipcap/bulk/shards.py",
           "while len(self.rows) >= self.shard_size:", "while len(self.rows) > self.shard_size:", BULK),
    Mutant("bulk: a resume with other settings mixes the runs", "clipcap/bulk/shards.py",
           "if previous != settings and shard_paths(out):", "if previous != settings and not shard_paths(out):", BULK),
    # formats
    Mutant("formats: a manifest's decoder_logits accepts any value", "clipcap/formats/export_bundle.py",
           "if manifest.decoder_logits != \"last_position\":", "if manifest.decoder_logits is None:", FORMATS),
    Mutant("formats: weights of the wrong shape but the right size load", "clipcap/formats/model_bundle.py",
           "for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]",
           "for k in sorted(set(state) & set(expected)) if state[k].numel() != expected[k].numel()]", FORMATS),
    Mutant("formats: a tokenizer larger than the embedding accepted", "clipcap/formats/model_bundle.py",
           "if tokenizer.vocab_size > config.gpt2.vocab_size:", "if tokenizer.vocab_size > config.gpt2.n_positions * 100:",
           FORMATS),
    # export parity
    Mutant("export: graph parity takes the best shape, not the worst", "clipcap/export/onnx.py",
           "worst = max(cases.values())", "worst = min(cases.values())", PARITY),
    Mutant("export: decoding parity compares lengths, not tokens", "clipcap/export/onnx.py",
           "same = sum(a == b for a, b in zip(expected, got))",
           "same = sum(len(a) == len(b) for a, b in zip(expected, got))", PARITY),
    Mutant("export: graph parity bound loosened tenfold", "clipcap/export/onnx.py",
           "if worst > spec.atol:", "if worst > 10 * spec.atol:", PARITY),
    # the command line
    Mutant("cli: seeds restart at each batch", "clipcap/cli.py",
           "for position, name in enumerate(names, start):", "for position, name in enumerate(names):", CLI),
]


def copy_checkout(into: Path) -> None:
    """The files git tracks or would track (untracked, not ignored), and a link to .venv."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)
    (into / ".venv").symlink_to(ROOT / ".venv")


def run_tests(copy: Path, tests: tuple[str, ...], timeout: int) -> str:
    """'caught', 'caught (timeout)' or 'survived'."""
    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        result = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "caught (timeout)"
    if result.returncode == 5:
        raise SystemExit(f"no tests collected by {' '.join(tests)}")
    return "survived" if result.returncode == 0 else "caught"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="run the mutants whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per mutant's test run (then: caught)")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or any(word in m.name for word in args.only)]
    if args.list:
        for mutant in mutants:
            print(f"{mutant.name}  [{mutant.file}]")
        return 0
    with tempfile.TemporaryDirectory(prefix="clipcap-mutation-") as folder:
        copy = Path(folder)
        copy_checkout(copy)
        for mutant in mutants:  # every mutant applies before any runs: a stale one stops the run at once
            count = (copy / mutant.file).read_text().count(mutant.old)
            if count != 1:
                raise SystemExit(f"{mutant.name}: its line occurs {count} times in {mutant.file} (must be once)")
        survivors = []
        for index, mutant in enumerate(mutants, 1):
            path = copy / mutant.file
            original = path.read_text()
            path.write_text(original.replace(mutant.old, mutant.new))
            start = time.perf_counter()
            try:
                verdict = run_tests(copy, mutant.tests, args.timeout)
            finally:
                path.write_text(original)
            print(f"[{index:2d}/{len(mutants)}] {verdict:16s} {time.perf_counter() - start:6.0f} s  {mutant.name}",
                  flush=True)
            if verdict == "survived":
                survivors.append(mutant)
    caught = len(mutants) - len(survivors)
    print(f"\ncaught {caught} of {len(mutants)} mutants: {100 * caught / len(mutants):.0f}%")
    for mutant in survivors:
        print(f"survived: {mutant.name} ({mutant.file}: {mutant.old!r} -> {mutant.new!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

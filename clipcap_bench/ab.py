"""The A/B regression run: the library at a base commit against the working tree, in paired interleaved rounds.

Each arm is a worker process that imports `clipcap` from its own tree (the base commit's `clipcap/`
unpacked with `git archive` under `work`, or the working tree) and this harness from the working
tree, loads the bundle once, warms up, and then captions `requests` images per round on demand. The
rounds alternate the arms (`experiment.interleaved_rounds`); each round reduces an arm's requests to
one number per metric, named as LLM serving benchmarks name them:

- `ttft`: time to first token, ms (preprocess + encode + the prefix step), median of the round;
- `tpot`: time per output token after the first, ms, median of the round;
- `e2e`: end-to-end latency of a request, ms, median of the round;
- `goodput`: requests per second that finished within the objective (twice the base arm's median
  end-to-end latency in the warm-up round, the same objective for both arms).

`clipcap_bench.paired.judge` then weighs each metric's paired rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from clipcap_bench.experiment import interleaved_rounds
from clipcap_bench.paired import PairedTest, PairedVerdict, judge

METRICS = {"ttft": "lower", "tpot": "lower", "e2e": "lower", "goodput": "higher"}  # name -> which way is better


@dataclass
class ABConfig:
    base: str = "HEAD~1"  # git revision whose clipcap/ is the old arm; the working tree is the new arm
    bundle: Path = Path("models/shapes-demo")  # the model bundle both arms caption with
    rounds: int = 30  # paired rounds (30: a 25% slowdown is flagged in >= 95% of simulated reruns here)
    requests: int = 4  # captions per arm and round
    tokens: int = 20  # tokens per caption (fixed length: both arms do equal work)
    threads: int = 1  # torch threads per worker
    rerun: bool = False  # both arms on the working tree (an A/A run: confirms a flag, measures false alarms)
    slowdown: float = 1.0  # planted slowdown of the new arm (every runtime call takes this many times as long)
    work: Path = Path("build/bench/ab")  # the base tree, the harness link and the results

    def validate(self) -> "ABConfig":
        if self.rounds < 1 or self.requests < 1 or self.threads < 1:
            raise ValueError(f"rounds, requests and threads must be >= 1, got {self.rounds}, {self.requests}, "
                             f"{self.threads}")
        if self.tokens < 2:
            raise ValueError(f"tokens must be >= 2 (time per output token needs a second one), got {self.tokens}")
        if self.slowdown < 1:
            raise ValueError(f"slowdown is a factor >= 1 (1: none), got {self.slowdown}")
        return self


def round_metrics(requests: list[dict], wall_s: float, objective_ms: float) -> dict[str, float]:
    """One arm's round (each request's `ttft`, `tpot`, `e2e` in ms) reduced to one value per metric."""
    e2e = [r["e2e"] for r in requests]
    within = sum(value <= objective_ms for value in e2e)
    return {"ttft": float(np.median([r["ttft"] for r in requests])),
            "tpot": float(np.median([r["tpot"] for r in requests])), "e2e": float(np.median(e2e)),
            "goodput": within / wall_s}


def judge_rounds(rounds: dict[str, list[dict[str, float]]], test: PairedTest) -> list[PairedVerdict]:
    """Each metric of the paired rounds {"old": [...], "new": [...]}; a metric with a zero round is left out
    (goodput when no request met the objective)."""
    verdicts = []
    for metric, better in METRICS.items():
        old, new = ([r[metric] for r in rounds[arm]] for arm in ("old", "new"))
        if min(old + new) > 0:
            verdicts.append(judge(metric, old, new, better, test))
    return verdicts


def run_paired(arms: dict[str, Callable[[], dict]], rounds: int, progress: bool = True) -> dict:
    """{"old": [...], "new": [...], "objective_ms": ...}: one round's metrics per entry; `arms` maps old and new
    to a callable running one round. Each arm's first round is a warm-up; the old arm's median e2e in it sets
    the goodput objective."""
    warm = {name: arm() for name, arm in arms.items()}
    objective_ms = 2 * float(np.median([r["e2e"] for r in warm["old"]["requests"]]))

    def measure(name: str) -> Callable[[str], dict]:
        def once(_: str) -> dict:
            result = arms[name]()
            return round_metrics(result["requests"], result["wall_s"], objective_ms)
        return once

    samples = interleaved_rounds({name: measure(name) for name in arms}, ["bundle"], rounds, progress=progress,
                                 desc="paired rounds")
    return {name: samples[(name, "bundle")] for name in arms} | {"objective_ms": objective_ms}


def base_tree(repo: Path, revision: str, work: Path) -> Path:
    """The `clipcap/` package of `revision`, unpacked once under work/base-<sha>."""
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{revision}^{{commit}}"], cwd=repo, capture_output=True,
                         text=True)
    if sha.returncode:
        raise ValueError(f"not a commit in {repo}: {revision!r} ({sha.stderr.strip()})")
    tree = work / f"base-{sha.stdout.strip()[:12]}"
    if not (tree / "clipcap" / "__init__.py").is_file():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", "--format=tar", sha.stdout.strip(), "clipcap"], cwd=repo,
                                 capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


class Worker:
    """One arm: a process captioning on demand with the `clipcap` of `tree` (see `worker_main`)."""

    def __init__(self, tree: Path, harness: Path, bundle: Path, config: ABConfig, slowdown: float):
        settings = json.dumps({"bundle": str(bundle), "requests": config.requests,
                               "tokens": config.tokens, "threads": config.threads, "slowdown": slowdown})
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(harness), str(tree)]), "OMP_NUM_THREADS": str(config.threads)}
        self.process = subprocess.Popen([sys.executable, "-m", "clipcap_bench.ab", settings], env=env, cwd=tree,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        said = self.process.stdout.readline().split()
        if not said or said[0] != "ready":
            self.close()
            raise RuntimeError(f"the worker on {tree} did not start (said {' '.join(said)!r}; its error is above)")
        self.library = said[1]  # the clipcap package it imported: the tree's, or the comparison is void
        if Path(self.library).resolve().parent != Path(tree).resolve():
            self.close()
            raise RuntimeError(f"the worker on {tree} imported clipcap from {self.library}, not from that tree")

    def __call__(self) -> dict:
        self.process.stdin.write("round\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("a worker stopped in the middle of the run (its error is above)")
        return json.loads(line)

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait(timeout=60)


@contextmanager
def paired_workers(config: ABConfig, repo: Path) -> Iterator[tuple[dict[str, Worker], Path]]:
    """({"old": worker, "new": worker}, the old arm's tree); the workers stop on leaving."""
    config.validate()
    work = (repo / config.work).resolve()
    harness = work / "harness"  # holds only a link to this harness: the arms' own `clipcap` comes from their tree
    harness.mkdir(parents=True, exist_ok=True)
    if not (harness / "clipcap_bench").exists():
        (harness / "clipcap_bench").symlink_to(Path(__file__).resolve().parent)
    old_tree = repo if config.rerun else base_tree(repo, config.base, work)
    bundle = (repo / config.bundle).resolve()
    workers = {}
    try:
        workers["old"] = Worker(old_tree, harness, bundle, config, 1.0)
        workers["new"] = Worker(repo, harness, bundle, config, config.slowdown)
        yield workers, old_tree
    finally:
        for worker in workers.values():
            worker.close()


def run_ab(config: ABConfig, repo: Path, test: PairedTest = PairedTest(), progress: bool = True) -> dict:
    """Both arms' paired rounds and the verdicts, as a JSON-able report."""
    with paired_workers(config, repo) as (workers, _):
        rounds = run_paired(workers, config.rounds, progress)
        libraries = {name: worker.library for name, worker in workers.items()}
    verdicts = judge_rounds(rounds, test)
    return {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
            "test": asdict(test), "libraries": libraries, "rounds": rounds,
            "verdicts": [asdict(v) for v in verdicts], "load_average": list(os.getloadavg())}


def worker_main(settings: dict) -> None:
    """Load, warm up, say `ready`; then per `round` line caption `requests` images and print their timings."""
    import torch
    from PIL import Image

    from clipcap_bench.backends import open_backends
    from clipcap_bench.latency import measure_once

    torch.set_num_threads(settings["threads"])
    opened, unavailable = open_backends(["torch"], [Path(settings["bundle"])], "cpu")
    if "torch" not in opened:
        raise SystemExit(f"cannot open {settings['bundle']}: {unavailable}")
    backend = opened["torch"]
    if settings["slowdown"] != 1.0:
        _plant_slowdown(backend.timed.inner, settings["slowdown"])
    images = [Image.new("RGB", (64, 48), (40 * i % 256, 90, 160)) for i in range(settings["requests"])]
    tokens = settings["tokens"]

    def one_round() -> dict:
        start, requests = time.perf_counter(), []
        for image in images:
            sample = measure_once(backend, [image], tokens)
            decode_steps = sum(sample["token_steps"])
            requests.append({"ttft": sample["end_to_end"] - decode_steps, "tpot": decode_steps / max(1, tokens - 1),
                             "e2e": sample["end_to_end"]})
        return {"requests": requests, "wall_s": time.perf_counter() - start}

    import clipcap

    one_round()  # warm-up
    print("ready", Path(clipcap.__file__).resolve().parent, flush=True)
    for line in sys.stdin:
        if line.strip() == "round":
            print(json.dumps(one_round()), flush=True)


def _plant_slowdown(runtime, factor: float) -> None:
    """Make every encode and decoder step of `runtime` take `factor` times as long (a sleep after each call)."""
    for name in ("encode", "step"):
        call = getattr(runtime, name)

        def slowed(*args, _call=call):
            start = time.perf_counter()
            result = _call(*args)
            time.sleep((factor - 1) * (time.perf_counter() - start))
            return result

        setattr(runtime, name, slowed)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="an A/B worker (started by clipcap_bench.ab.run_ab)")
    parser.add_argument("settings", help="JSON settings")
    worker_main(json.loads(parser.parse_args().settings))

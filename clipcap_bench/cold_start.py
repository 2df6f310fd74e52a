"""What a worker costs to start and to keep: install size, process start -> first caption, idle memory.

Arms are (virtualenv, bundle, front). Each virtualenv is a separate install of the project (the core
install without torch, `make setup`'s full one), so "today's path" and the slim one run side by side
in one run; their starts alternate, so load on a shared machine hits both alike. Fronts:
- `cli`: `clipcap caption BUNDLE IMAGE` as a user runs it, process start to exit;
- `ray-serve`: `clipcap serve-ray BUNDLE` in its own process, from its start to the first caption
  answered 200 (polled); then, idle, the replica's USS and PSS;
- `torchserve`: TorchServe started as serving/README.md starts it (clipcap_bench.torchserve), from
  `torchserve --start` to the first caption answered; then, idle, the worker's USS and PSS. Only for
  a virtualenv that has TorchServe.
Install sizes: each virtualenv on disk, and each extra's own packages (what installing it adds to the
core, summed from the installed files of its requirement closure in the full virtualenv).
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import statistics
import subprocess
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from clipcap_bench.schema import COLD_START_SCHEMA, Envelope, check_report
from clipcap_bench.targets import TARGETS

FRONTS = ("cli", "ray-serve", "torchserve")
EXTRAS = ("torch", "export", "train", "serve", "serve-ray", "openvino", "bench", "ray")


@dataclass
class ColdStartConfig:
    venvs: dict[str, Path]  # label -> virtualenv (e.g. core: the install without torch; full: make setup's)
    bundles: dict[str, Path]  # label -> bundle (e.g. demo export, full-size int8 export)
    repo: Path  # the checkout: serving/ for TorchServe
    image: Path | None = None  # the image captioned; None: a synthetic photo-sized JPEG
    fronts: tuple[str, ...] = FRONTS  # which fronts to start
    starts: int = 3  # process starts per arm (the median is reported)
    idle_s: float = 2.0  # after the first caption, the worker idles this long before its memory is read
    threads: int = 1  # compute threads of every worker (OMP_NUM_THREADS)
    timeout_s: float = 300.0  # per start
    work_dir: Path = Path("build/bench/cold-start")  # archives, TorchServe's directory, the test image

    def __post_init__(self):
        # Absolute, since TorchServe and Ray start in directories of their own.
        self.venvs = {label: Path(venv).absolute() for label, venv in self.venvs.items()}
        self.bundles = {label: Path(bundle).absolute() for label, bundle in self.bundles.items()}

    def validate(self) -> "ColdStartConfig":
        unknown = set(self.fronts) - set(FRONTS)
        if unknown or not self.venvs or not self.bundles or self.starts < 1:
            raise ValueError(f"cold start needs venvs, bundles, starts >= 1 and fronts from {FRONTS}; "
                             f"unknown fronts: {sorted(unknown)}")
        for label, venv in self.venvs.items():
            if not (Path(venv) / "bin" / "python").exists():
                raise ValueError(f"venv {label!r}: no {Path(venv) / 'bin' / 'python'}")
        return self


def directory_mb(path: Path) -> float:
    """Bytes of the regular files under `path` (each hard link once), in MiB."""
    seen, total = set(), 0
    for root, _, files in os.walk(path):
        for name in files:
            stat = os.lstat(os.path.join(root, name))
            if stat.st_ino not in seen:
                seen.add(stat.st_ino)
                total += stat.st_size
    return total / 2**20


# Run inside the full virtualenv: the MiB each extra adds to the core install (its requirement closure's
# installed files, minus the core's). Requirement markers are evaluated with the extra set.
_EXTRA_SIZES = r"""
import json, sys
from importlib import metadata
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement

def closure(name, extras=()):
    seen, todo = set(), [(name, tuple(extras))]
    while todo:
        dist_name, wanted = todo.pop()
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            continue
        key = dist.metadata["Name"].lower().replace("_", "-")
        if (key, wanted) in seen:
            continue
        seen.add((key, wanted))
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in wanted] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, tuple(req.extras)))
    return {key for key, _ in seen}

def mib(names):
    total = 0
    for name in names:
        for file in metadata.distribution(name).files or []:
            try:
                total += file.locate().stat().st_size
            except OSError:
                pass
    return total / 2**20

core = closure("clipcap-deploy")
sizes = {"core": mib(core)}
for extra in sys.argv[1:]:
    sizes[extra] = mib(closure("clipcap-deploy", [extra]) - core)
print(json.dumps(sizes))
"""


def extra_sizes_mb(python: Path, extras: tuple[str, ...] = EXTRAS) -> dict[str, float]:
    result = subprocess.run([str(python), "-c", _EXTRA_SIZES, *extras], capture_output=True, text=True, check=True,
                            timeout=300)
    return json.loads(result.stdout)


def worker_memory_mb(pids: list[int]) -> dict[str, float]:
    """USS and PSS (MiB) summed over `pids`: what the workers alone hold, and their share of what they share."""
    import psutil

    infos = [psutil.Process(pid).memory_full_info() for pid in pids]
    return {"uss_mb": sum(i.uss for i in infos) / 2**20, "pss_mb": sum(getattr(i, "pss", i.uss) for i in infos) / 2**20}


def graph_mb(bundle: Path) -> float:
    """The weights a worker holds for `bundle`: its graph and weight files."""
    suffixes = (".onnx", ".data", ".bin", ".safetensors", ".xml", ".engine")
    return sum(p.stat().st_size for p in Path(bundle).rglob("*") if p.suffix in suffixes) / 2**20


def _caption_once(url: str, token: str, image: bytes, timeout_s: float) -> bool:
    request = urllib.request.Request(url, data=image, method="POST", headers={
        "Content-Type": "image/jpeg", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status == 200
    except OSError:  # not listening yet, 503 while loading
        return False


def _until_captioned(url: str, token: str, image: bytes, start: float, timeout_s: float, alive) -> float:
    while not _caption_once(url, token, image, timeout_s):
        if not alive() or time.monotonic() - start > timeout_s:
            raise RuntimeError(f"no caption from {url} within {timeout_s:.0f} s of the start")
        time.sleep(0.05)
    return time.monotonic() - start


def start_cli(venv: Path, bundle: Path, image_path: Path, threads: int, timeout_s: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.monotonic()
    subprocess.run([str(venv / "bin" / "clipcap"), "caption", str(bundle), str(image_path)], env=env, check=True,
                   stdout=subprocess.DEVNULL, timeout=timeout_s)
    return {"start_s": time.monotonic() - start}


def start_ray(venv: Path, bundle: Path, image: bytes, config: ColdStartConfig) -> dict:
    import psutil

    from clipcap_bench.torchserve import free_ports

    port, token = free_ports(1)[0], secrets.token_urlsafe(24)
    env = {**os.environ, "OMP_NUM_THREADS": str(config.threads), "CLIPCAP_SERVE_TOKEN": token}
    start = time.monotonic()
    process = subprocess.Popen([str(venv / "bin" / "clipcap"), "serve-ray", str(bundle), "--port", str(port)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        took = _until_captioned(f"http://127.0.0.1:{port}/predictions/clipcap", token, image, start,
                                config.timeout_s, lambda: process.poll() is None)
        time.sleep(config.idle_s)
        replicas = [p.pid for p in psutil.Process(process.pid).children(recursive=True)
                    if "ServeReplica:" in " ".join(p.cmdline())]
        return {"start_s": took, **worker_memory_mb(replicas)}
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def start_torchserve(venv: Path, bundle: Path, image: bytes, config: ColdStartConfig, store: Path) -> dict:
    from clipcap_bench.torchserve import LocalTorchServe

    server = LocalTorchServe(config.work_dir / "torchserve", store, ["clipcap"], config.repo, config.threads,
                             start_timeout_s=config.timeout_s, python=venv / "bin" / "python", progress=False)
    start = time.monotonic()
    with server:
        took = _until_captioned(f"{server.url}/predictions/clipcap", server.keys()["inference"], image, start,
                                config.timeout_s, lambda: server.processes[0].is_running())
        time.sleep(config.idle_s)
        memory = worker_memory_mb([p.pid for p in server.processes[1:]])
    return {"start_s": took, **memory}


def has_torchserve(venv: Path) -> bool:
    return any((venv / "lib").glob("python*/site-packages/ts/model_server.py"))


def run_cold_start(config: ColdStartConfig, progress: bool = True) -> dict:
    """Every arm started `config.starts` times, arms alternating; returns the report."""
    from tqdm import tqdm

    from clipcap_bench.photos import phone_jpeg
    from clipcap_bench.torchserve import pack_archives

    config.validate()
    envelope = Envelope(COLD_START_SCHEMA)
    config.work_dir.mkdir(parents=True, exist_ok=True)
    image = phone_jpeg(seed=0) if config.image is None else Path(config.image).read_bytes()
    image_path = config.work_dir / "image.jpg"
    image_path.write_bytes(image)
    arms = [(venv, bundle, front) for front in config.fronts for bundle in config.bundles for venv in config.venvs
            if front != "torchserve" or has_torchserve(Path(config.venvs[venv]))]
    stores = {}
    if "torchserve" in config.fronts:
        for bundle, path in config.bundles.items():
            stores[bundle] = config.work_dir / "model_store" / bundle
            pack_archives(stores[bundle], {"clipcap": (path, None)}, config.repo, progress)
    samples: dict[tuple[str, str, str], list[dict]] = {arm: [] for arm in arms}
    with tqdm(total=len(arms) * config.starts, desc="cold starts", unit="start", disable=not progress) as bar:
        for round_index in range(config.starts):
            for venv, bundle, front in (arms if round_index % 2 == 0 else arms[::-1]):
                bar.set_postfix_str(f"{front} {bundle} {venv}")
                venv_path, bundle_path = Path(config.venvs[venv]), Path(config.bundles[bundle])
                if front == "cli":
                    sample = start_cli(venv_path, bundle_path, image_path, config.threads, config.timeout_s)
                elif front == "ray-serve":
                    sample = start_ray(venv_path, bundle_path, image, config)
                else:
                    sample = start_torchserve(venv_path, bundle_path, image, config, stores[bundle])
                samples[(venv, bundle, front)].append(sample)
                bar.update()
    help_s = {venv: _help_seconds(Path(path), config.starts) for venv, path in config.venvs.items()}
    cells = [_cell(venv, bundle, front, runs, graph_mb(Path(config.bundles[bundle])))
             for (venv, bundle, front), runs in samples.items()]
    installs = {venv: directory_mb(Path(path)) for venv, path in config.venvs.items()}
    full = max(config.venvs, key=lambda venv: installs[venv])
    report = envelope.report({**asdict(config), "image": str(config.image or "a synthetic 12 MP JPEG")},
                             install_mb=installs, extra_mb=extra_sizes_mb(Path(config.venvs[full]) / "bin" / "python"),
                             help_s=help_s, cells=cells, targets=[])
    report["targets"] = cold_start_targets(report)
    check_report(report)
    return report


def _help_seconds(venv: Path, starts: int) -> float:
    times = []
    for _ in range(starts):
        start = time.monotonic()
        subprocess.run([str(venv / "bin" / "clipcap"), "--help"], check=True, stdout=subprocess.DEVNULL, timeout=120)
        times.append(time.monotonic() - start)
    return statistics.median(times)


def _cell(venv: str, bundle: str, front: str, runs: list[dict], weights_mb: float) -> dict:
    cell = {"venv": venv, "bundle": bundle, "front": front, "starts_s": [r["start_s"] for r in runs],
            "start_s": statistics.median(r["start_s"] for r in runs), "weights_mb": weights_mb}
    if "uss_mb" in runs[0]:
        cell |= {"uss_mb": statistics.median(r["uss_mb"] for r in runs),
                 "pss_mb": statistics.median(r["pss_mb"] for r in runs)}
    return cell


def cold_start_targets(report: dict) -> list[dict]:
    """Each goal of targets.toml's [cold_start] against the report: met, missed, or None (not measured)."""
    goals = TARGETS.cold_start
    rows = []

    def add(target: str, measured: float | None, limit: float, where: str, unit: str) -> None:
        rows.append({"target": f"{target} <= {limit:g} {unit}", "where": where,
                     "measured": None if measured is None else round(measured, 3),
                     "met": None if measured is None else measured <= limit})

    core = [venv for venv in report["install_mb"] if venv == goals.core_venv]
    add("core install", report["install_mb"][core[0]] if core else None, goals.core_install_mb, goals.core_venv, "MB")
    add("clipcap --help", report["help_s"].get(goals.core_venv), goals.help_s, goals.core_venv, "s")
    for cell in report["cells"]:
        where = f"{cell['front']}, {cell['bundle']}, {cell['venv']}"
        if cell["front"] == "cli" and cell["bundle"] == goals.demo_bundle:
            add("caption one image, process included", cell["start_s"], goals.caption_s, where, "s")
        elif cell["front"] != "cli":
            limit = goals.first_caption_demo_s if cell["bundle"] == goals.demo_bundle else goals.first_caption_full_s
            add("start to first caption", cell["start_s"], limit, where, "s")
            add("idle worker USS", cell["uss_mb"], goals.idle_uss_mb + cell["weights_mb"], where + " (limit: "
                f"{goals.idle_uss_mb:g} + its weights {cell['weights_mb']:.0f})", "MB")
    return rows


def cold_start_markdown(report: dict) -> str:
    from clipcap_bench.report import _header

    lines = _header(report, "Cold start: install size, start to first caption, idle memory") + [
        "## Install size (MiB on disk)", "", "| virtualenv | MiB |", "|---|---:|"]
    lines += [f"| {venv} | {mb:.0f} |" for venv, mb in report["install_mb"].items()]
    lines += ["", "What each extra adds to the core (its packages' installed files):", "", "| extra | MiB |", "|---|---:|"]
    lines += [f"| {extra} | {mb:.0f} |" for extra, mb in report["extra_mb"].items()]
    lines += ["", "`clipcap --help`: " + ", ".join(f"{venv} {s:.2f} s" for venv, s in report["help_s"].items()) + ".",
              "", "## Starts (median of the starts; idle memory after the first caption)", "",
              "| front | bundle | virtualenv | start -> first caption s | starts | USS MiB | PSS MiB | weights MiB |",
              "|---|---|---|---:|---|---:|---:|---:|"]
    for c in report["cells"]:
        memory = f"{c['uss_mb']:.0f} | {c['pss_mb']:.0f}" if "uss_mb" in c else "– | –"
        lines.append(f"| {c['front']} | {c['bundle']} | {c['venv']} | {c['start_s']:.2f} | "
                     f"{', '.join(f'{s:.2f}' for s in c['starts_s'])} | {memory} | {c['weights_mb']:.0f} |")
    lines += ["", "## Targets", "", "| target | where | measured | met |", "|---|---|---|---|"]
    for t in report["targets"]:
        lines.append(f"| {t['target']} | {t['where']} | {t['measured']} | "
                     f"{ {True: '**met**', False: '**missed**', None: 'not measured'}[t['met']]} |")
    return "\n".join(lines) + "\n"


def plot_cold_start(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = report["cells"]
    labels = [f"{c['front']}\n{c['bundle']}\n{c['venv']}" for c in cells]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(cells)), 4.5))
    ax.bar(range(len(cells)), [c["start_s"] for c in cells], color="tab:blue")
    ax.set_xticks(range(len(cells)), labels, fontsize=7)
    ax.set_ylabel("process start -> first caption (s, median)")
    ax.set_title("Cold start per front, bundle and install")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(report: dict, out: Path) -> list[Path]:
    from clipcap_bench.schema import write_outputs as write

    return write(report, out, "cold_start", cold_start_markdown, {"cold_start.png": plot_cold_start})

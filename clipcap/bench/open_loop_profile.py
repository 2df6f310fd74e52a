"""Open-loop serving load for the photo profile: the demo model behind a private TorchServe, 12 MP phone
JPEGs arriving as a Poisson process at each offered rate; p50/p99 and the fraction answered within
the latency objective per rate (clipcap.bench.load.run_open_loop), as markdown and a plot.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class OpenLoopProfile:
    bundle: Path = Path("models/shapes-demo")  # the demo model bundle shipped in the repository
    work: Path = Path("build/bench/photo")  # .mar, payload files and the server's folder
    rates: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])  # offered requests/s
    duration_s: float = 20.0  # sending time per rate
    slo_ms: float = 1000.0  # the latency objective
    payloads: int = 2  # distinct 12 MP phone JPEGs sent in turn
    threads: int = 1  # OMP_NUM_THREADS of the worker


def run_demo_open_loop(profile: OpenLoopProfile, repo: Path, progress: bool = True) -> dict:
    """Pack the demo bundle, serve it, load it open-loop at each rate with phone JPEGs, stop."""
    from clipcap.bench.load import OpenLoopConfig, run_open_loop
    from clipcap.bench.photos import phone_jpeg
    from clipcap.bench.torchserve import LocalTorchServe
    from clipcap.export.mar import ArchiveConfig, build_archive

    work = repo / profile.work
    store = work / "model_store"
    build_archive(ArchiveConfig(bundle=repo / profile.bundle, handler=repo / "serving" / "handler.py",
                                model_config=repo / "serving" / "model-config.yaml", out=store / "clipcap-demo.mar"))
    images = []
    for seed in range(profile.payloads):
        path = work / "payloads" / f"phone-{seed}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(phone_jpeg(seed=seed))
        images.append(path)
    with LocalTorchServe(work / "torchserve", store, ["clipcap-demo"], repo, threads=profile.threads) as server:
        config = OpenLoopConfig(url=server.url, models=["clipcap-demo"], rates=profile.rates,
                                duration_s=profile.duration_s, slo_ms=profile.slo_ms, images=images)
        return run_open_loop(config, server.keys(), progress=progress)


def open_loop_markdown(report: dict) -> str:
    settings = report["settings"]
    lines = [f"# Open-loop serving load ({report['created_utc']})", "",
             f"Poisson arrivals, {settings['duration_s']:g} s of sending per rate, each request timed from its "
             f"scheduled send; latency objective {settings['slo_ms']:g} ms. Load average before/after: "
             f"{report['load_average']['before'][0]:.1f} / {report['load_average']['after'][0]:.1f}.", "",
             "| model | offered req/s | sent | answered 200 | p50 ms | p99 ms | within objective | send lag ms |",
             "|---|---|---|---|---|---|---|---|"]
    for cell in report["cells"]:
        latency = cell["latency_ms"]
        p50, p99 = (f"{latency[k]:.0f}" if latency else "-" for k in ("p50", "p99"))
        lines.append(f"| {cell['model']} | {cell['rate']:g} | {cell['sent']} | {cell['ok']} | {p50} | {p99} | "
                     f"{cell['within_slo']:.0%} | {cell['send_lag_ms']:.0f} |")
    return "\n".join(lines) + "\n"


def plot_open_loop(report: dict, path: Path) -> Path:
    from clipcap.bench.report import pyplot, save_figure

    plt = pyplot()
    figure, (latency_axis, slo_axis) = plt.subplots(1, 2, figsize=(9, 3.6))
    for model in dict.fromkeys(c["model"] for c in report["cells"]):
        cells = [c for c in report["cells"] if c["model"] == model and c["latency_ms"]]
        rates = [c["rate"] for c in cells]
        latency_axis.plot(rates, [c["latency_ms"]["p50"] for c in cells], "o-", label=f"{model} p50")
        latency_axis.plot(rates, [c["latency_ms"]["p99"] for c in cells], "s--", label=f"{model} p99")
        slo_axis.plot(rates, [c["within_slo"] for c in cells], "o-", label=model)
    latency_axis.set(xlabel="offered requests/s", ylabel="latency, ms", yscale="log", title="Open-loop latency")
    slo_axis.set(xlabel="offered requests/s", ylabel="fraction", ylim=(0, 1.05),
                 title=f"answered within {report['settings']['slo_ms']:g} ms")
    latency_axis.legend()
    slo_axis.legend()
    return save_figure(figure, path)


def write_open_loop_outputs(report: dict, out: Path) -> list[Path]:
    from clipcap.bench.schema import write_outputs

    return write_outputs(report, out, "open_loop", open_loop_markdown, {"open_loop.png": plot_open_loop})

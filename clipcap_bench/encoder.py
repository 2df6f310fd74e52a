"""Image encoder options side by side: open_clip eager (the torch runtime) and each export bundle's encoder
graph, timed interleaved in one run against the ViT's roofline floor, each with its CLIP embeddings'
cosine to PyTorch's. What the reports in benchmarks/results/encoder-floor/ are measured with."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from clipcap.runtimes import set_compute_threads
from clipcap_bench.experiment import rotation
from clipcap_bench.roofline import StepCost, cost_floor_s, measure_peaks, vit_image_cost
from clipcap_bench.schema import ENCODER_SCHEMA, Envelope, check_report

EAGER = "open_clip eager"  # the reference option's name: TorchRuntime.encode on the model bundle
EAGER_BF16 = "open_clip eager bf16"  # TorchBf16Runtime.encode: the tower's weights and arithmetic in bfloat16


@dataclass
class EncoderBenchConfig:
    model: Path  # the model bundle: open_clip eager, and the reference embeddings
    exports: list[Path] = field(default_factory=list)  # export bundles whose encoder graphs are compared
    batch_sizes: tuple[int, ...] = (1, 8)
    rounds: int = 10  # measured calls per option and batch, interleaved round-robin (order rotated each round)
    warmup: int = 2  # unmeasured calls per option and batch first
    threads: int = 1  # torch and onnxruntime intra-op threads
    torch_bf16: bool = False  # also time open_clip with its tower in bfloat16 (the torch-bf16 runtime)

    def validate(self) -> None:
        if self.rounds < 1 or self.warmup < 0 or self.threads < 1 or not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError("rounds and threads must be >= 1, warmup >= 0, batch sizes >= 1")


def option_name(path: Path, manifest) -> str:
    """`<bundle dir> (<encoder graph file>)`: which graph of which bundle a row times."""
    return f"{path.name} ({manifest.graphs['encoder'].file})"


def run_encoder_bench(config: EncoderBenchConfig, progress: bool = True) -> dict:
    from tqdm import tqdm

    from clipcap.runtimes.onnx_runtime import OnnxRuntime
    from clipcap.runtimes.torch_runtime import TorchBf16Runtime, TorchRuntime

    config.validate()
    set_compute_threads(config.threads)  # torch and the onnxruntime sessions opened after this
    envelope = Envelope(ENCODER_SCHEMA)
    runtimes = {EAGER: TorchRuntime.from_path(Path(config.model))}
    if config.torch_bf16:
        runtimes[EAGER_BF16] = TorchBf16Runtime.from_path(Path(config.model))
    graph_bytes = {}
    for path in map(Path, config.exports):
        runtime = OnnxRuntime.from_path(path, threads=config.threads)
        name = option_name(path, runtime.manifest)
        runtimes[name] = runtime
        graph = path / runtime.manifest.graphs["encoder"].file  # an OpenVINO IR: its weights in the .bin beside it
        graph_bytes[name] = sum(f.stat().st_size for f in (graph, graph.with_suffix(".bin")) if f.is_file())
    clip = runtimes[EAGER].config.clip
    peaks = measure_peaks()
    cpu_peaks = measure_peaks(thread_clock=True) if config.threads == 1 else None  # for the CPU-time floors
    image = vit_image_cost(clip)
    names = list(runtimes)
    rows = []
    with tqdm(total=len(config.batch_sizes) * len(names) * (config.warmup + config.rounds), desc="encoder",
              unit="call", disable=not progress) as bar:
        for batch in config.batch_sizes:
            pixels = torch.randn(batch, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(batch))
            reference = runtimes[EAGER].encode_image(pixels)
            wall, cpu = ({name: [] for name in names} for _ in range(2))
            for round_index in range(config.warmup + config.rounds):
                for name in rotation(names, round_index):
                    start, start_cpu = time.perf_counter(), time.thread_time()
                    runtimes[name].encode(pixels)
                    if round_index >= config.warmup:
                        wall[name].append(1e3 * (time.perf_counter() - start))
                        cpu[name].append(1e3 * (time.thread_time() - start_cpu))
                    bar.update()
            p50 = {name: float(np.median(wall[name])) for name in names}
            cpu_p50 = {name: float(np.median(cpu[name])) for name in names}
            for name in names:
                embeds = runtimes[name].encode_image(pixels)
                cosine = torch.nn.functional.cosine_similarity(torch.as_tensor(embeds).float(),  # numpy from onnxruntime
                                                               torch.as_tensor(reference).float(), dim=-1)
                row = {"option": name, "batch_size": batch, "p50_ms": p50[name], "cpu_p50_ms": cpu_p50[name],
                       "speedup_vs_eager": p50[EAGER] / p50[name], "cpu_speedup_vs_eager": cpu_p50[EAGER] / cpu_p50[name],
                       "cosine_min": float(cosine.min()), "cosine_mean": float(cosine.mean())}
                if image is not None:
                    cost = StepCost(batch * image.flops, graph_bytes.get(name, image.weight_bytes), 0.0)
                    floor_ms = 1e3 * cost_floor_s(cost, peaks)
                    row.update(floor_ms=floor_ms, x_floor=p50[name] / floor_ms)
                    if cpu_peaks is not None:
                        cpu_floor_ms = 1e3 * cost_floor_s(cost, cpu_peaks)
                        row.update(cpu_floor_ms=cpu_floor_ms, cpu_x_floor=cpu_p50[name] / cpu_floor_ms)
                rows.append(row)
    report = envelope.report(asdict(config), peaks=peaks, cpu_peaks=cpu_peaks,
                             gflop_per_image=image.flops / 1e9 if image else None, rows=rows)
    check_report(report)
    return report


def encoder_markdown(report: dict) -> str:
    machine, peaks, settings = report["machine"], report["peaks"], report["settings"]
    lines = ["# Image encoder options", "",
             f"Measured {report['created_utc']} on **{machine['cpu']}** (ISA: {', '.join(machine['isa']) or 'none recorded'}), "
             f"{settings['threads']} thread(s), load average before {', '.join(f'{v:.2f}' for v in report['load_average']['before'])}, "
             f"after {', '.join(f'{v:.2f}' for v in report['load_average']['after'])} (a shared machine: compare ratios).", "",
             f"{settings['rounds']} calls per option and batch after {settings['warmup']} warm-up, interleaved round-robin; "
             "wall time, and the calling thread's CPU time (all of the work at 1 thread; on a loaded machine it leaves "
             "out the time other jobs held the core). "
             f"Floor: {report['gflop_per_image']:.2f} GFLOP per image at the fastest fp32 matmul measured in the same run, "
             f"{peaks['matmul_gflops']:.1f} GFLOP/s ({peaks['matmul_library']}, {peaks['matmul_size']}^3), or the graph's "
             f"bytes at {peaks['bandwidth_gbps']:.1f} GB/s if slower"
             + (f"; the CPU-time floor from the same ceilings timed by the thread's CPU clock: "
                f"{cpu['matmul_gflops']:.1f} GFLOP/s ({cpu['matmul_library']}, {cpu['matmul_size']}^3), "
                f"{cpu['bandwidth_gbps']:.1f} GB/s" if (cpu := report["cpu_peaks"]) else "")
             + ". Cosine: CLIP embeddings against PyTorch fp32, same pixels.",
             "", "| option | batch | p50 ms (CPU ms) | x floor (CPU) | vs eager (CPU) | cosine min / mean |",
             "|---|---:|---:|---:|---:|---|"]
    for row in report["rows"]:
        floor = f"{row['x_floor']:.2f} ({row['cpu_x_floor']:.2f})" if "cpu_x_floor" in row else \
            f"{row['x_floor']:.2f}" if "x_floor" in row else "–"
        lines.append(f"| {row['option']} | {row['batch_size']} | {row['p50_ms']:.1f} ({row['cpu_p50_ms']:.1f}) | {floor} | "
                     f"{row['speedup_vs_eager']:.2f}x ({row['cpu_speedup_vs_eager']:.2f}x) | "
                     f"{row['cosine_min']:.5f} / {row['cosine_mean']:.5f} |")
    return "\n".join(lines) + "\n"


def plot_encoder(report: dict, path: Path) -> Path:
    from clipcap_bench.report import figure_legend, pyplot, save_figure

    plt = pyplot()
    batches = sorted({row["batch_size"] for row in report["rows"]})
    figure, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 3.5), squeeze=False)
    for axis, batch in zip(axes[0], batches):
        rows = [row for row in report["rows"] if row["batch_size"] == batch]
        axis.barh([row["option"] for row in rows], [row["cpu_p50_ms"] for row in rows], color="tab:blue")
        floors = [row.get("cpu_floor_ms", row.get("floor_ms")) for row in rows]  # the bars' clock
        if floors[0] is not None:
            axis.axvline(min(floors), color="tab:red", linestyle="--", label="roofline floor")
        axis.set_title(f"batch {batch}: encode p50, CPU ms", fontsize=9)
        axis.tick_params(labelsize=7)
    figure_legend(figure, axes)
    save_figure(figure, path)
    return path

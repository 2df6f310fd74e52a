"""scripts/gpu_check.sh on a machine without CUDA runs to the end, skipping each GPU step with its reason;
the parity check it runs works on any device pair (here cpu against cpu) and refuses a device it lacks."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from clipcap_bench.device_parity import DeviceParityConfig, check_device_parity
from clipcap_bench.bundles import make_full_size_bundles

ROOT = Path(__file__).resolve().parent.parent
GPU_STEPS = ["gpu-tests", "full-size", "parity", "latency", "fp16"]


def run_check(out: Path, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", **extra_env}  # no GPU, even where there is one
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_gpu_check_skips_every_gpu_step_with_its_reason(tmp_path):
    result = run_check(tmp_path / "results")
    assert result.returncode == 0, result.stdout + result.stderr
    steps = {s["step"]: s for s in json.loads((tmp_path / "results" / "summary.json").read_text())["steps"]}
    assert list(steps) == ["environment", "wheels", *GPU_STEPS]
    assert steps["environment"]["status"] == "ok"
    assert "cuda available: False" in (tmp_path / "results" / "environment.log").read_text()
    for name in GPU_STEPS:
        assert steps[name]["status"] == "skipped" and "no CUDA GPU" in steps[name]["reason"], steps[name]


def test_gpu_check_fp16_step_can_be_left_out(tmp_path):
    result = run_check(tmp_path / "results", SKIP_FP16="1")
    assert result.returncode == 0, result.stdout + result.stderr
    steps = {s["step"]: s for s in json.loads((tmp_path / "results" / "summary.json").read_text())["steps"]}
    assert steps["fp16"] == {"step": "fp16", "status": "skipped", "seconds": 0, "reason": "SKIP_FP16 set"}
    assert not (tmp_path / "results" / "fp16").exists()


def test_gpu_check_pack_leaves_two_files(tmp_path):
    out = tmp_path / "results"
    assert run_check(out, "--pack").returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.tar.gz", "summary.json"]
    with tarfile.open(out / "gpu-check.tar.gz") as archive:
        assert "./environment.log" in archive.getnames()


def test_device_parity_cpu_against_cpu(tiny_bundle):
    report = check_device_parity(DeviceParityConfig(tiny_bundle, device="cpu", images=3, max_tokens=8))
    assert report["identical"] and report["prefix_max_abs_diff"] == 0.0
    assert {name: (s["identical"], s["of"]) for name, s in report["strategies"].items()} == \
        {"greedy": (3, 3), "beam": (3, 3)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_parity_script_refuses_a_missing_device(tiny_bundle, tmp_path):
    script = ROOT / "benchmarks" / "device_parity.py"
    result = subprocess.run([sys.executable, str(script), str(tiny_bundle), "--device", "cuda"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and "no CUDA GPU" in result.stderr
    ok = subprocess.run([sys.executable, str(script), str(tiny_bundle), "--device", "cpu", "--images", "2",
                         "--max-tokens", "6", "--out", str(tmp_path / "parity.json")],
                        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "parity.json").read_text())[str(tiny_bundle)]["identical"]


def test_full_size_model_only_builds_no_exports(tmp_path, monkeypatch):
    """What the GPU check's full-size step builds: the model bundle, no ONNX (minutes on a CPU)."""
    import clipcap.export.onnx
    import clipcap.formats.model_bundle

    monkeypatch.setattr(clipcap.export.onnx, "export_bundle", lambda *a, **k: pytest.fail("exported"))
    saved = []
    monkeypatch.setattr(clipcap.formats.model_bundle, "save_bundle", lambda model, tok, path: saved.append(path))
    paths = make_full_size_bundles(tmp_path, exports=False)
    assert paths == {"model": tmp_path / "model"} and saved == [tmp_path / "model"]

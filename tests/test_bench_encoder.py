"""The encoder options benchmark: every option timed at every batch, fp32 graphs on PyTorch's embeddings."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_encoder_bench_script(tiny_bundle, tiny_export, tmp_path):
    out = tmp_path / "encoder"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "encoder.py"), str(tiny_bundle), str(tiny_export),
                             "--out", str(out), "--batch-sizes", "1,3", "--rounds", "2", "--warmup", "1", "--torch-bf16"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "encoder.json").read_text())
    rows = {(row["option"], row["batch_size"]): row for row in report["rows"]}
    assert set(rows) == {(name, batch) for name in ("open_clip eager", "open_clip eager bf16",
                                                    f"{tiny_export.name} (encoder.onnx)") for batch in (1, 3)}
    for (name, batch), row in rows.items():
        # fp32 graph and eager compute the same embedding; bfloat16 keeps 8 bits of mantissa
        assert row["cosine_min"] > (0.995 if name.endswith("bf16") else 1 - 1e-5)
        assert row["floor_ms"] > 0 and row["x_floor"] == row["p50_ms"] / row["floor_ms"]
    assert rows[("open_clip eager", 1)]["speedup_vs_eager"] == 1.0
    assert (out / "encoder.png").stat().st_size > 0 and "| open_clip eager | 1 |" in (out / "encoder.md").read_text()

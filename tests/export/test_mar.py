"""Packing a bundle into a TorchServe archive (clipcap.export.mar)."""
import json
import zipfile
from pathlib import Path

import pytest
import yaml

from clipcap.config import BundleError
from clipcap.export.mar import ArchiveConfig, build_archive
from clipcap.serving_config import ServingConfigError

SERVING = Path(__file__).resolve().parents[2] / "serving"


def test_build_archive_packs_bundle_handler_and_config(tiny_bundle, tmp_path):
    out = build_archive(ArchiveConfig(bundle=tiny_bundle, handler=SERVING / "handler.py",
                                      model_config=SERVING / "model-config.yaml", out=tmp_path / "store" / "cc.mar",
                                      backend="torch", device_type="gpu"))
    with zipfile.ZipFile(out) as archive:
        names = set(archive.namelist())
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        packed = yaml.safe_load(archive.read("model-config.yaml"))
    assert {"handler.py", "model-config.yaml", "bundle/clipcap.json", "bundle/model.safetensors",
            "bundle/tokenizer.json"} <= names
    assert manifest["model"] == {**manifest["model"], "modelName": "cc", "handler": "handler.py",
                                 "configFile": "model-config.yaml"}
    assert packed["deviceType"] == "gpu" and packed["handler"]["backend"] == "torch"
    assert packed["batchSize"] == yaml.safe_load((SERVING / "model-config.yaml").read_text())["batchSize"]


def test_build_archive_refuses_bad_inputs(tiny_bundle, tmp_path):
    config = dict(handler=SERVING / "handler.py", model_config=SERVING / "model-config.yaml")
    with pytest.raises(BundleError, match="bundle directory not found"):
        build_archive(ArchiveConfig(bundle=tmp_path / "missing", **config))
    with pytest.raises(ValueError, match="must be NAME.mar"):
        build_archive(ArchiveConfig(bundle=tiny_bundle, out=tmp_path / "clip cap.mar", **config))
    with pytest.raises(ServingConfigError, match="handler.backend 'nope'"):
        build_archive(ArchiveConfig(bundle=tiny_bundle, out=tmp_path / "x.mar", backend="nope", **config))
    assert not list(tmp_path.glob("*.mar"))


BUILD_MAR = SERVING / "build_mar.py"


@pytest.mark.parametrize("edit, fragment", [
    (lambda text: text.replace("batchSize: 8", "batchSize: eight"), "batchSize must be an integer >= 1, got 'eight'"),
    (lambda text: text.replace("minWorkers: 1", "minWorkers: 2"), "minWorkers (2) must be <= maxWorkers (1)"),
    (lambda text: text.replace("responseTimeout: 120", "responseTimeout: -5"), "responseTimeout must be an integer"),
    (lambda text: text + "batchsize: 8\n", "unknown key 'batchsize'"),
    (lambda text: text.replace("  device: auto", "  device: gpu"), "handler.device must be auto, cpu, cuda"),
    (lambda text: text.replace("handler:\n", "handler:\n  defaults: [\n"), "model-config.yaml:"),
])
def test_build_mar_refuses_a_config_torchserve_would_not_run_as_written(edit, fragment, tiny_bundle, tmp_path):
    """One line naming the key (a YAML error: file:line:column), exit 2, no traceback, no archive."""
    import subprocess
    import sys

    model_config = tmp_path / "model-config.yaml"
    model_config.write_text(edit((SERVING / "model-config.yaml").read_text()))
    result = subprocess.run([sys.executable, str(BUILD_MAR), "--bundle", str(tiny_bundle), "--model-config",
                             str(model_config), "--out", str(tmp_path / "cc.mar")], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and fragment in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "cc.mar").exists()

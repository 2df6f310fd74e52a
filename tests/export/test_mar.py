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

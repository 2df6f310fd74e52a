"""A bundle packed into a TorchServe archive (.mar) with torch-model-archiver.

The archive holds the bundle (as `bundle/`), the handler file and model-config.yaml, whose
`handler:` section and TorchServe keys (clipcap.serving_config) are checked here, not at worker start.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ArchiveConfig:
    bundle: Path  # a model bundle or an export bundle
    handler: Path  # the TorchServe handler file
    model_config: Path  # model-config.yaml: TorchServe's per-model settings + the handler: section
    out: Path = Path("build/model_store/clipcap.mar")  # the file name (without .mar) is the model name
    backend: str | None = None  # replaces handler.backend in the packed model-config.yaml
    device_type: str | None = None  # replaces deviceType (cpu | gpu) in the packed model-config.yaml


def build_archive(config: ArchiveConfig) -> Path:
    """Pack `config.bundle` (as `bundle/`), the handler and model-config.yaml into a .mar; returns its path."""
    import yaml

    from clipcap import __version__
    from clipcap.formats.model_bundle import load_config
    from clipcap.serving_config import MODEL_CONFIG_FILE, check_model_config, read_model_config

    load_config(config.bundle)  # a broken bundle fails here, not in a TorchServe worker
    for path in (config.handler, config.model_config):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: file not found")
    if config.out.suffix != ".mar" or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-.]*", config.out.stem):
        raise ValueError(f"{config.out}: must be NAME.mar, NAME of letters, digits, '_', '-', '.'")
    settings = read_model_config(config.model_config)
    handler_section = settings["handler"] = settings.get("handler") or {}
    if config.backend:
        handler_section["backend"] = config.backend
    if config.device_type:
        settings["deviceType"] = config.device_type
    serving = check_model_config(settings, str(config.model_config))  # refuse a bad config now, not at worker start
    config.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="clipcap-mar-") as tmp:
        extra = Path(tmp) / "extra"  # its contents land at the archive root: bundle/...
        shutil.copytree(config.bundle, extra / serving.bundle)
        packed_config = Path(tmp) / MODEL_CONFIG_FILE
        packed_config.write_text(yaml.safe_dump(settings, sort_keys=False))
        command = [sys.executable, "-m", "model_archiver.model_packaging", "--model-name", config.out.stem,
                   "--version", __version__, "--handler", str(config.handler), "--extra-files", str(extra),
                   "--config-file", str(packed_config), "--export-path", str(config.out.parent), "--force"]
        # The archiver stages files in $TMPDIR/<model name>: a private TMPDIR keeps parallel builds apart.
        result = subprocess.run(command, env={**os.environ, "TMPDIR": tmp}, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"torch-model-archiver failed:\n{result.stderr.strip() or result.stdout.strip()}")
    return config.out

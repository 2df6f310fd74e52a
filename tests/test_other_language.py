"""A GPT-2-family model for another language, through every script: Vietnamese captions (multi-byte UTF-8,
diacritics) with their own tokenizer, trained by training/train.py from `--gpt2` given a local GPT-2
folder with its tokenizer files, exported to ONNX, and captioned identically and intact by `clipcap
caption` (text and --json), caption-dataset's Parquet and TorchServe's JSON.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipcap.bulk.shards import shard_paths
from clipcap.captioner import Captioner
from clipcap.cli import main as clipcap_main
from clipcap.tokenizer import INCOMPLETE, train_bpe
from conftest import random_images, write_gpt2_folder
from test_tokenizer import VIETNAMESE

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # trains and exports a model (~1 min on 2 quiet cores), then runs TorchServe
DIACRITICS = set("ộìòàđơươạủếôểữăềỏ")  # some of the letters VIETNAMESE uses beyond ASCII


@pytest.fixture(scope="module")
def vietnamese(tmp_path_factory, tiny_bundle):
    """(images folder, model bundle, ONNX export bundle), made by the scripts a user runs."""
    from export import to_onnx
    from training import extract_features, train

    root = tmp_path_factory.mktemp("vietnamese")
    images = root / "images"
    images.mkdir()
    for index, image in enumerate(random_images(len(VIETNAMESE))):
        image.save(images / f"{index}.png")
    rows = [json.dumps({"image": f"images/{i}.png", "captions": [c] * 5}, ensure_ascii=False)
            for i, c in enumerate(VIETNAMESE)]
    (root / "pairs.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    gpt2 = write_gpt2_folder(root / "gpt2-vi", train_bpe(VIETNAMESE * 4, vocab_size=300))
    assert extract_features.main(["--data", str(root / "pairs.jsonl"), "--clip-bundle", str(tiny_bundle),
                                  "--out", str(root / "features")]) == 0
    assert train.main(["--features", str(root / "features"), "--gpt2", str(gpt2), "--out", str(root / "model"),
                       "--prefix-length", "4", "--epochs", "20", "--batch-size", "10", "--lr", "1e-2",
                       "--warmup-steps", "2", "--val-fraction", "0", "--threads", "1", "--keep-checkpoints", "1"]) == 0
    assert to_onnx.main([str(root / "model"), "--out", str(root / "onnx")]) == 0
    return images, root / "model", root / "onnx"


@pytest.fixture(scope="module")
def expected(vietnamese):
    """image file name -> (caption, token ids) from the trained model bundle on torch: what every path must give."""
    images, model, _ = vietnamese
    paths = sorted(images.glob("*.png"))
    captions = Captioner.from_path(model).caption_images([Image.open(p) for p in paths]).captions
    return {p.name: (c.caption, c.token_ids) for p, c in zip(paths, captions)}


def test_the_model_captions_in_vietnamese_with_its_own_tokenizer(vietnamese, expected):
    _, model, _ = vietnamese
    assert json.loads((model / "tokenizer.json").read_text(encoding="utf-8"))["model"]["type"] == "BPE"
    for caption, _ in expected.values():
        assert caption in VIETNAMESE and INCOMPLETE not in caption  # intact: a training caption, whole
    assert len({c for c, _ in expected.values()}) >= len(VIETNAMESE) // 2  # not one caption for every image
    assert DIACRITICS & set("".join(c for c, _ in expected.values()))


def test_clipcap_caption_text_and_json_on_the_onnx_export(vietnamese, expected, capsys):
    images, _, onnx = vietnamese
    paths = [str(p) for p in sorted(images.glob("*.png"))]
    assert clipcap_main(["caption", str(onnx), *paths, "--json"]) == 0
    printed = capsys.readouterr().out
    assert "\\u" not in printed  # the JSON carries the text as written, not escaped
    rows = json.loads(printed)
    assert {Path(r["image"]).name: (r["caption"], r["token_ids"]) for r in rows} == expected
    # Text mode in a fresh process: the bytes on stdout are the captions in UTF-8.
    run = subprocess.run([sys.executable, "-m", "clipcap.cli", "caption", str(onnx), *paths], capture_output=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    lines = [line.split("\t") for line in run.stdout.decode("utf-8").splitlines()]
    assert {Path(name).name: caption for name, caption in lines} == {k: c for k, (c, _) in expected.items()}


def test_caption_dataset_parquet(vietnamese, expected, tmp_path):
    images, _, onnx = vietnamese
    assert clipcap_main(["caption-dataset", str(onnx), str(images), "--out", str(tmp_path / "out")]) == 0
    rows = [row for path in shard_paths(tmp_path / "out") for row in pq.read_table(path).to_pylist()]
    assert {Path(r["path"]).name: (r["caption"], list(r["token_ids"])) for r in rows} == expected


@pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java 11+ (make setup installs it)")
@pytest.mark.skipif(not (Path(sys.executable).parent / "torchserve").exists(), reason="torchserve is not installed")
def test_torchserve_json(vietnamese, expected, tmp_path):
    """Its own small TorchServe (the session one serves the demo model), serving the ONNX export."""
    from clipcap.export.mar import ArchiveConfig, build_archive
    from test_serving_e2e import TorchServe

    images, _, onnx = vietnamese
    mar = build_archive(ArchiveConfig(bundle=onnx, handler=ROOT / "serving" / "handler.py",
                                      model_config=ROOT / "serving" / "model-config.yaml",
                                      out=tmp_path / "model_store" / "clipcap-vi.mar"))
    server = TorchServe(tmp_path, mar)
    try:
        server.start()
        for path in sorted(images.glob("*.png")):
            status, body = server.predict(path.read_bytes(), {"Content-Type": "image/png"})
            assert status == 200, body
            assert (body["caption"], body["token_ids"]) == expected[path.name], path.name
    finally:
        assert server.stop() == []

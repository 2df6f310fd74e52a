"""The clipcap command: caption, caption-embeddings, errors with exit code 2."""
import json

import numpy as np

from clipcap.captioner import Captioner
from clipcap.cli import main
from conftest import random_images


def _write_images(tmp_path, count=3):
    paths = []
    for i, image in enumerate(random_images(count)):
        path = tmp_path / f"img{i}.png"
        image.save(path)
        paths.append(str(path))
    return paths


def test_caption_json_matches_library(tiny_bundle, tmp_path, capsys):
    paths = _write_images(tmp_path)
    assert main(["caption", str(tiny_bundle), *paths, "--json", "--batch-size", "2"]) == 0
    results = json.loads(capsys.readouterr().out)
    expected = Captioner.from_path(tiny_bundle).caption_images(random_images(3)).captions
    assert [r["image"] for r in results] == paths
    assert [r["token_ids"] for r in results] == [c.token_ids for c in expected]
    assert [r["caption"] for r in results] == [c.caption for c in expected]


def test_bad_image_reported_others_captioned(tiny_bundle, tmp_path, capsys):
    paths = _write_images(tmp_path, 2)
    (tmp_path / "bad.png").write_bytes(b"nope")
    code = main(["caption", str(tiny_bundle), paths[0], str(tmp_path / "bad.png"), str(tmp_path / "gone.png"),
                 paths[1], "--json"])
    out = capsys.readouterr()
    assert code == 2
    assert "bad.png: not a recognised image" in out.err and "gone.png: file not found" in out.err
    assert [r["image"] for r in json.loads(out.out)] == [paths[0], paths[1]]


def test_caption_embeddings(tiny_bundle, tmp_path, capsys):
    np.save(tmp_path / "emb.npy", np.random.default_rng(0).standard_normal((5, 24)).astype(np.float32))
    assert main(["caption-embeddings", str(tiny_bundle), str(tmp_path / "emb.npy"), "--json",
                 "--decoding", "beam", "--beam-size", "2"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["index"] for r in results] == [0, 1, 2, 3, 4] and all(r["token_ids"] for r in results)


def test_wrong_embedding_shape_and_options(tiny_bundle, tmp_path, capsys):
    np.save(tmp_path / "emb.npy", np.zeros((5, 7), dtype=np.float32))
    assert main(["caption-embeddings", str(tiny_bundle), str(tmp_path / "emb.npy")]) == 2
    assert "embeddings must have shape (N, 24)" in capsys.readouterr().err
    assert main(["caption", str(tiny_bundle), "x.png", "--beam-size", "0", "--decoding", "beam"]) == 2
    assert "beam_size" in capsys.readouterr().err
    assert main(["caption", str(tmp_path / "missing"), "x.png"]) == 2
    assert "bundle directory not found" in capsys.readouterr().err

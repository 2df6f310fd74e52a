"""The clipcap command: caption, caption-embeddings, errors with exit code 2."""
import json

import numpy as np
import pytest

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


def _paper_checkpoint(bundle_dir, tmp_path, tokenizer):
    """A checkpoint in the paper's layout (no CLIP) + the tiny CLIP config and tokenizer.json it needs."""
    import torch
    from clipcap.formats.model_bundle import load_bundle
    from conftest import TINY_CLIP

    model = load_bundle(bundle_dir).model
    tmp_path.mkdir(exist_ok=True)
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("clip.")}, tmp_path / "w.pt")
    (tmp_path / "clip.json").write_text(json.dumps(TINY_CLIP))
    tokenizer.save(tmp_path / "tokenizer.json")
    return ["import-original", str(tmp_path / "w.pt"), "--clip-model", str(tmp_path / "clip.json"),
            "--tokenizer", str(tmp_path / "tokenizer.json"), "--clip-pretrained", "none",
            "--out", str(tmp_path / "out")]


def test_import_original_summary_and_random_clip_warning(tiny_transformer_bundle, tiny_tokenizer, tmp_path, capsys):
    args = _paper_checkpoint(tiny_transformer_bundle, tmp_path, tiny_tokenizer)
    assert main(args + ["--normalize-prefix"]) == 0
    out = capsys.readouterr()
    assert "transformer mapper, 8 heads x 2 layers, prefix_length 4, normalised prefix, CLIP clip (random weights)" \
        in out.out
    assert "warning: --clip-pretrained none" in out.err and "RANDOM" in out.err and "MB)" in out.err
    assert "--normalize-prefix" not in out.err  # stated explicitly: no hint


def test_import_original_hints_normalize_prefix_for_transformer(tiny_transformer_bundle, tiny_bundle, tiny_tokenizer,
                                                                tmp_path, capsys):
    assert main(_paper_checkpoint(tiny_transformer_bundle, tmp_path / "t", tiny_tokenizer)) == 0
    out = capsys.readouterr()
    assert "unnormalised prefix" in out.out
    assert "warning: transformer mapper imported without --normalize-prefix" in out.err
    confirmed = _paper_checkpoint(tiny_transformer_bundle, tmp_path / "u", tiny_tokenizer) + ["--no-normalize-prefix"]
    assert main(confirmed) == 0
    assert "without --normalize-prefix" not in capsys.readouterr().err
    assert main(_paper_checkpoint(tiny_bundle, tmp_path / "m", tiny_tokenizer)) == 0  # MLP checkpoints: no hint
    out = capsys.readouterr()
    assert "mlp mapper, prefix_length 4, unnormalised prefix" in out.out and "normalize-prefix" not in out.err


def test_formats_option_narrows_what_is_read(tiny_bundle, tmp_path, capsys):
    import pytest

    paths = _write_images(tmp_path, 2)
    random_images(1)[0].save(tmp_path / "photo.jpg")
    code = main(["caption", str(tiny_bundle), str(tmp_path / "photo.jpg"), *paths, "--formats", "jpeg", "--json"])
    out = capsys.readouterr()
    assert code == 2 and out.err.count("format PNG not accepted (accepted: JPEG)") == 2
    assert [r["image"] for r in json.loads(out.out)] == [str(tmp_path / "photo.jpg")]
    with pytest.raises(SystemExit) as exit_info:
        main(["caption", str(tiny_bundle), paths[0], "--formats", "JPEG,PSD"])
    assert exit_info.value.code == 2 and "unknown image format(s) PSD" in capsys.readouterr().err


# -- cold start: what each path imports ------------------------------------------------------------------


def _imported_after(code: str) -> set[str]:
    """Top-level packages among torch, transformers, open_clip that `code` imports, in a fresh interpreter."""
    import subprocess
    import sys

    probe = code + "\nimport sys\nprint('imported:', *sorted({m.split('.')[0] for m in sys.modules} & " \
                   "{'torch', 'transformers', 'open_clip'}))"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return set(run.stdout.splitlines()[-1].split()[1:])


def test_help_and_argument_errors_import_no_torch(tiny_bundle):
    help_path = "from clipcap.cli import main\ntry:\n    main(['caption', '--help'])\nexcept SystemExit:\n    pass"
    assert _imported_after(help_path) == set()
    refused = (f"from clipcap.cli import main\nassert main(['caption', {str(tiny_bundle)!r}, 'x.png', "
               "'--beam-size', '3']) == 2")
    assert _imported_after(refused) == set()


def test_export_bundle_on_onnxruntime_imports_neither_transformers_nor_open_clip(tiny_export, tmp_path):
    paths = _write_images(tmp_path, 1)
    code = f"from clipcap.cli import main\nassert main(['caption', {str(tiny_export)!r}, {paths[0]!r}]) == 0"
    assert _imported_after(code) <= {"torch"}  # the onnxruntime runtime still hands torch tensors to decoding


# -- decoding flags a strategy would ignore ----------------------------------------------------------------


@pytest.mark.parametrize("flags, named", [
    (["--beam-size", "3"], "--beam-size is used only by --decoding beam"),
    (["--temperature", "0.5"], "--temperature is used only by --decoding beam or nucleus"),
    (["--top-p", "0.5", "--decoding", "beam"], "--top-p is used only by --decoding nucleus"),
    (["--seed", "1", "--decoding", "beam"], "--seed is used only by --decoding nucleus"),
])
def test_a_flag_the_strategy_would_ignore_is_refused(tiny_bundle, tmp_path, capsys, flags, named):
    paths = _write_images(tmp_path, 1)
    for command in (["caption", str(tiny_bundle), *paths], ["caption-dataset", str(tiny_bundle), str(tmp_path),
                                                            "--out", str(tmp_path / "out")]):
        assert main(command + flags) == 2
        assert named in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_flags_of_the_chosen_strategy_are_accepted(tiny_bundle, tmp_path, capsys):
    paths = _write_images(tmp_path, 1)
    assert main(["caption", str(tiny_bundle), *paths, "--decoding", "nucleus", "--seed", "1", "--top-p", "0.5",
                 "--temperature", "0.7"]) == 0
    assert main(["caption", str(tiny_bundle), *paths, "--decoding", "beam", "--beam-size", "2",
                 "--temperature", "0.7"]) == 0


# -- images: folders, directories, bounded look-ahead ------------------------------------------------------


def test_caption_takes_a_folder(tiny_bundle, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    paths = _write_images(folder, 3)
    (folder / "notes.txt").write_text("not an image")
    assert main(["caption", str(tiny_bundle), str(folder), "--json"]) == 0
    out = capsys.readouterr()
    assert [r["image"] for r in json.loads(out.out)] == sorted(paths)
    assert f"{folder}: 1 files skipped, not of the accepted --formats (1 .txt)" in out.err


def test_a_directory_given_as_an_image_is_named_a_directory(tiny_bundle, tmp_path):
    from clipcap.images import ImageError, load_image_file

    with pytest.raises(ImageError, match="is a directory, not an image file"):
        Captioner.from_path(tiny_bundle).load_pixels_file(tmp_path)
    with pytest.raises(ImageError, match="is a directory"):
        load_image_file(tmp_path)


def test_caption_decodes_one_batch_ahead_at_most(tiny_bundle, tmp_path, capsys, monkeypatch):
    """Pixels are decoded per batch: before the first batch is captioned, no more than one batch is loaded."""
    paths = _write_images(tmp_path, 7)
    calls = []
    load, caption = Captioner.load_pixels_file, Captioner.caption_pixels
    monkeypatch.setattr(Captioner, "load_pixels_file", lambda self, *a, **k: calls.append("load") or load(self, *a, **k))
    monkeypatch.setattr(Captioner, "caption_pixels",
                        lambda self, *a, **k: calls.append("caption") or caption(self, *a, **k))
    assert main(["caption", str(tiny_bundle), *paths, "--batch-size", "2", "--json"]) == 0
    assert calls == ["load", "load", "caption"] * 3 + ["load", "caption"]
    assert [r["image"] for r in json.loads(capsys.readouterr().out)] == paths

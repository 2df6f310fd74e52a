"""Caption metrics (pycocoevalcap, exact match) and the evaluation runner, on tiny data."""
from __future__ import annotations

import json

import pytest

from clipcap.decoding import DecodingOptions
from clipcap.training.metrics import caption_scores, exact_match, format_table
from tests.conftest import random_images
from training import evaluate as evaluate_script

REFERENCES = {
    "1": ["a small red circle."],
    "2": ["a large blue square."],
    "3": ["a green triangle to the left of a purple circle.", "a purple circle to the right of a green triangle."],
    "4": ["a yellow square above an orange triangle.", "an orange triangle below a yellow square."],
}


def test_perfect_predictions_score_one_and_wrong_ones_lower():
    perfect = {k: refs[0] for k, refs in REFERENCES.items()}
    wrong = {"1": "a large green square.", "2": "a small blue circle.",
             "3": "a purple circle to the left of a green triangle.", "4": "a red circle."}
    good, notes = caption_scores(perfect, REFERENCES)
    bad, _ = caption_scores(wrong, REFERENCES)
    for n in (1, 2, 3, 4):
        assert good[f"BLEU-{n}"] == pytest.approx(1.0, abs=1e-6)
        assert bad[f"BLEU-{n}"] < good[f"BLEU-{n}"]
    assert good["ROUGE-L"] == pytest.approx(1.0)
    for name in ("METEOR", "ROUGE-L", "CIDEr"):
        assert bad[name] < good[name], name
    if "SPICE" not in good:
        assert any("SPICE skipped" in note for note in notes)


def test_exact_match_accepts_any_reference_and_reports_groups():
    predictions = {"1": "a small red circle.", "2": "a small blue square.",
                   "3": "a purple circle to the right of a green triangle.", "4": "a yellow square below a cat."}
    groups = {"1": "one-object", "2": "one-object", "3": "two-object", "4": "two-object"}
    result = exact_match(predictions, REFERENCES, groups)
    assert result["overall"] == {"accuracy": 0.5, "correct": 2, "n": 4}
    assert result["one-object"]["accuracy"] == 0.5 and result["two-object"]["accuracy"] == 0.5
    assert set(exact_match(predictions, REFERENCES)) == {"overall"}
    table = format_table({"BLEU-4": 0.5}, result)
    assert "BLEU-4" in table and "50.00" in table and "exact match (two-object)" in table


def test_scoring_refuses_predictions_without_references():
    with pytest.raises(ValueError, match="without references"):
        caption_scores({"9": "a cat."}, REFERENCES)


def test_evaluate_writes_predictions_and_skips_unreadable_images(tiny_bundle, tmp_path, capsys):
    images = random_images(5)
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    rows = [{"image": f"{i}.png", "captions": ["a small red circle.", "a dog runs on the grass."], "group": "g"}
            for i in range(5)]
    rows += [{"image": "broken.png", "caption": "x."}, {"image": "absent.png", "caption": "y."}]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n{oops\n")

    # Through the script, which prints the table: the library call below gives the same predictions.
    evaluate_script.main([str(tiny_bundle), "--data", str(data), "--out", str(tmp_path / "eval"),
                          "--batch-size", "2", "--decoding", "beam", "--beam-size", "2"])
    printed = capsys.readouterr().out
    assert "BLEU-4" in printed and "exact match (g)" in printed and "2 missing/corrupt image(s) skipped" in printed
    assert "1 malformed row(s) skipped" in printed
    written = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    assert [p["image"] for p in written] == [f"{i}.png" for i in range(5)]
    scores = json.loads((tmp_path / "eval" / "scores.json").read_text())
    assert scores["decoding"]["strategy"] == "beam" and set(scores["scores"]) >= {"BLEU-4", "CIDEr", "METEOR"}
    assert sorted(scores["failed_images"]) == ["absent.png", "broken.png"] and scores["exact_match"]["g"]["n"] == 5

    from clipcap.captioner import Captioner
    from clipcap.training.evaluation import caption_records
    from clipcap.training.data import read_dataset

    predictions, failed = caption_records(Captioner.from_path(tiny_bundle), read_dataset(data).records, tmp_path,
                                          DecodingOptions(strategy="beam", beam_size=2), batch_size=3)
    assert predictions == written and sorted(failed) == ["absent.png", "broken.png"]

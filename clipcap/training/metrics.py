"""Caption metrics: the COCO caption scores via pycocoevalcap, and exact-match accuracy.

BLEU-1..4, METEOR, ROUGE-L and CIDEr are pycocoevalcap's (captions PTB-tokenised first, as the COCO
evaluation server does; METEOR and the tokeniser need Java). SPICE needs Stanford CoreNLP models
that pycocoevalcap downloads separately: it runs when they are present and is skipped, with a
note saying so, otherwise. Shared by training/evaluate.py and the benchmarks.
"""
from __future__ import annotations

from pathlib import Path

SCORE_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")
SPICE_MODELS_JAR = "stanford-corenlp-3.6.0-models.jar"


def spice_available() -> bool:
    import pycocoevalcap

    lib = Path(next(iter(pycocoevalcap.__path__))) / "spice" / "lib"
    return (lib / SPICE_MODELS_JAR).is_file()


def caption_scores(predictions: dict[str, str], references: dict[str, list[str]],
                   spice: bool = True) -> tuple[dict[str, float], list[str]]:
    """Corpus scores of one prediction per key against that key's references, and notes on what was skipped.

    Keys of `predictions` must all be in `references`; every key needs at least one reference.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if not predictions:
        raise ValueError("no predictions to score")
    missing = sorted(set(predictions) - set(references))
    if missing:
        raise ValueError(f"{len(missing)} prediction(s) without references, e.g. {missing[:3]}")
    keys = sorted(predictions)
    tokenizer = PTBTokenizer()
    results = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in keys})
    gts = tokenizer.tokenize({k: [{"caption": c} for c in references[k]] for k in keys})
    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, results, verbose=0)
    scores.update({f"BLEU-{n}": float(value) for n, value in enumerate(bleu, start=1)})
    scores["METEOR"] = float(Meteor().compute_score(gts, results)[0])
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, results)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, results)[0])
    notes = []
    if spice and spice_available():
        from pycocoevalcap.spice.spice import Spice

        scores["SPICE"] = float(Spice().compute_score(gts, results)[0])
    elif spice:
        notes.append(f"SPICE skipped: its Stanford CoreNLP models ({SPICE_MODELS_JAR}) are not in "
                     "pycocoevalcap/spice/lib; pycocoevalcap.spice.get_stanford_models fetches them")
    return scores, notes


def exact_match(predictions: dict[str, str], references: dict[str, list[str]],
                groups: dict[str, str | None] | None = None) -> dict[str, dict]:
    """Share of predictions equal to any of their references: overall and per group (when groups are named).

    Returns {"overall": {"accuracy", "correct", "n"}, "<group>": {...}, ...}.
    """
    tallies: dict[str, list[int]] = {"overall": [0, 0]}
    for key, prediction in predictions.items():
        hit = prediction.strip() in {r.strip() for r in references[key]}
        names = ["overall"] + ([groups[key]] if groups and groups.get(key) else [])
        for name in names:
            tally = tallies.setdefault(name, [0, 0])
            tally[0] += hit
            tally[1] += 1
    return {name: {"accuracy": correct / n, "correct": correct, "n": n} for name, (correct, n) in tallies.items()}


def format_table(scores: dict[str, float], accuracy: dict[str, dict] | None = None) -> str:
    """A plain-text table of the scores (x100, as papers print them) and exact-match accuracies."""
    lines = [f"{'metric':<24}{'score':>8}", "-" * 32]
    lines += [f"{name:<24}{scores[name] * 100:>8.2f}" for name in SCORE_NAMES if name in scores]
    for group, result in (accuracy or {}).items():
        label = f"exact match ({group})"
        lines.append(f"{label:<24}{result['accuracy'] * 100:>7.2f}%  ({result['correct']}/{result['n']})")
    return "\n".join(lines)

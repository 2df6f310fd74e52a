"""`detect(path)` tells the kinds of bundle apart; `Captioner.from_path` opens any of them unasked, reading each file once."""
import pytest

from clipcap.captioner import Captioner
from clipcap.config import CONFIG_FILE, BundleError, ClipCapConfig
from clipcap.formats import KINDS, detect
from clipcap.runtimes.onnx_runtime import OnnxRuntime
from clipcap.runtimes.torch_runtime import TorchRuntime
from clipcap.tokenizer import CaptionTokenizer
from conftest import random_images


@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.name)
def test_each_kind_is_told_by_its_own_file(kind, tmp_path):
    (tmp_path / CONFIG_FILE).write_text("{}")
    # A kind's marker plus the markers of every less specific kind (an int8 sibling has export.json too).
    for other in KINDS[KINDS.index(kind):]:
        (tmp_path / other.marker).write_bytes(b"")
    assert detect(tmp_path) == kind


def test_no_bundle_says_what_to_build(tmp_path):
    with pytest.raises(BundleError, match="bundle directory not found"):
        detect(tmp_path / "missing")
    (tmp_path / CONFIG_FILE).write_text("{}")
    with pytest.raises(BundleError, match="not a bundle") as error:
        detect(tmp_path)
    assert all(kind.how_to_build in str(error.value) for kind in KINDS)


def test_real_bundles(tiny_bundle, tiny_export):
    assert (detect(tiny_bundle).name, detect(tiny_bundle).backend) == ("model", "torch")
    assert (detect(tiny_export).name, detect(tiny_export).backend) == ("onnx-fp32", "onnxruntime")


def test_captioner_opens_an_export_bundle_unasked(tiny_bundle, tiny_export):
    images = random_images(3)
    unasked = Captioner.from_path(tiny_export)
    assert isinstance(unasked.runtime, OnnxRuntime)
    named = Captioner.from_path(tiny_export, backend="onnxruntime")
    reference = Captioner.from_path(tiny_bundle)
    assert isinstance(reference.runtime, TorchRuntime)
    tokens = [[c.token_ids for c in captioner.caption_images(images).captions] for captioner in (unasked, named)]
    assert tokens[0] == tokens[1]


def test_captioner_reads_config_and_tokenizer_once(tiny_bundle, monkeypatch):
    calls = {"config": 0, "tokenizer": 0}
    load, from_file = ClipCapConfig.load.__func__, CaptionTokenizer.from_file.__func__

    def counted_load(cls, path):
        calls["config"] += 1
        return load(cls, path)

    def counted_from_file(cls, path):
        calls["tokenizer"] += 1
        return from_file(cls, path)

    monkeypatch.setattr(ClipCapConfig, "load", classmethod(counted_load))
    monkeypatch.setattr(CaptionTokenizer, "from_file", classmethod(counted_from_file))
    Captioner.from_path(tiny_bundle)
    assert calls == {"config": 1, "tokenizer": 1}

"""The training pipeline at CI size: dataset readers, the feature cache, and the training loop.

A few hundred generated shapes images and a tiny random CLIP tower; no downloads.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_model

from clipcap.config import BundleError
from clipcap.formats.model_bundle import load_bundle
from clipcap.model import ClipCapModel
from clipcap.training import features as features_module
from clipcap.training.data import DatasetError, read_dataset
from clipcap.training.features import ClipSource, ExtractConfig, extract_features, load_clip_tower, load_features
from clipcap.training.trainer import Trainer, TrainConfig, caption_loss, pad_batch, train, trainable_parameters
from conftest import TINY_CLIP as CONFTEST_CLIP, tiny_config
from clipcap.training import shapes

N_IMAGES = 240
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_MODEL = dict(gpt2="random", gpt2_layers=2, gpt2_embd=64, gpt2_heads=1, gpt2_positions=40, bpe_vocab_size=300,
                  prefix_length=4, clip_length=4, mapper_layers=1, batch_size=32, lr=1e-3, warmup_steps=5,
                  threads=1, log_every=2)


class CountingTower(torch.nn.Module):
    """Wraps the CLIP tower and counts the images it is called on."""

    def __init__(self, tower):
        super().__init__()
        self.tower = tower
        self.images_seen = 0

    def forward(self, pixels):
        self.images_seen += pixels.shape[0]
        return self.tower(pixels)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    shapes.write_dataset(shapes.WriteConfig(out=out, n=N_IMAGES, seed=11))
    return out


@pytest.fixture(scope="module")
def clip_source(tmp_path_factory):
    from clipcap.model import build_clip_visual, resolve_clip_config

    folder = tmp_path_factory.mktemp("clip")
    (folder / "tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    tower = build_clip_visual(resolve_clip_config(str(folder / "tiny-clip.json")))
    save_model(tower, str(folder / "visual.safetensors"))
    return ClipSource(model=str(folder / "tiny-clip.json"), weights=folder / "visual.safetensors")


@pytest.fixture(scope="module")
def feature_dir(data, clip_source, tmp_path_factory):
    out = tmp_path_factory.mktemp("features") / "canonical"
    extract_features(ExtractConfig(data=data / "canonical.jsonl", image_root=data, out=out, clip=clip_source,
                                   part_size=100))
    return out


def counting(monkeypatch) -> list[CountingTower]:
    towers = []

    def load_counting(source):
        config, tower = load_clip_tower(source)
        towers.append(CountingTower(tower))
        return config, towers[-1]

    monkeypatch.setattr(features_module, "load_clip_tower", load_counting)
    return towers


def test_each_image_is_encoded_once_and_resume_skips_done_images(data, clip_source, tmp_path, monkeypatch):
    towers = counting(monkeypatch)
    config = ExtractConfig(data=data / "pairs.jsonl", image_root=data, out=tmp_path / "f", clip=clip_source,
                           part_size=64, batch_size=16)
    report = extract_features(config)
    # pairs.jsonl has one row per reference: 120 one-object rows + 2 x 120 two-object rows.
    assert len(read_dataset(data / "pairs.jsonl").pairs()) == N_IMAGES // 2 * 3
    assert towers[0].images_seen == N_IMAGES and report.embedded == N_IMAGES

    loaded = load_features(tmp_path / "f")
    assert loaded.embeddings.shape == (N_IMAGES, TINY_CLIP["embed_dim"])
    assert [r.image for r in loaded.records] == [f"images/{i:06d}.png" for i in range(N_IMAGES)]
    assert all(len(r.captions) == (1 if i % 2 == 0 else 2) for i, r in enumerate(loaded.records))

    # The cached embedding is the tower's output for that image.
    from clipcap.images import load_image_file, preprocess

    _, tower = load_clip_tower(clip_source)
    pixels = preprocess([load_image_file(data / "images/000007.png")], 32, loaded.clip.mean, loaded.clip.std)
    assert torch.allclose(tower(torch.from_numpy(pixels))[0], loaded.embeddings[7], atol=1e-5)

    # An interrupted run: drop the last part from the index; the rerun encodes only those images.
    index = json.loads((tmp_path / "f" / "index.json").read_text())
    lost = index["parts"].pop()
    (tmp_path / "f" / "index.json").write_text(json.dumps(index))
    again = extract_features(config)
    assert towers[1].images_seen == len(lost["images"]) == again.embedded
    assert again.reused == N_IMAGES - len(lost["images"])
    assert torch.equal(load_features(tmp_path / "f").embeddings, loaded.embeddings)


def test_bad_rows_and_images_are_skipped_and_counted(data, clip_source, tmp_path, capsys):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    lines = [json.dumps({"image": f"images/{i:06d}.png", "caption": "a small red circle."}) for i in range(5)]
    lines += [
        "{not json",
        json.dumps({"image": "images/000005.png"}),  # no caption
        json.dumps({"caption": "a small red circle."}),  # no image
        json.dumps({"image": "missing.png", "caption": "a small red circle."}),
        json.dumps({"image": "corrupt.png", "caption": "a small red circle."}),
    ]
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    for i in range(5):
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / f"images/{i:06d}.png").write_bytes((data / f"images/{i:06d}.png").read_bytes())
    report = extract_features(ExtractConfig(data=tmp_path / "rows.jsonl", image_root=tmp_path,
                                            out=tmp_path / "f", clip=clip_source))
    assert report.skipped_rows == 3
    assert sorted(report.failed) == ["corrupt.png", "missing.png"]
    assert report.embedded == 5
    assert "3 malformed row(s)" in report.summary() and "2 missing/corrupt" in report.summary()
    assert [r.image for r in load_features(tmp_path / "f").records] == [f"images/{i:06d}.png" for i in range(5)]


def test_readers_for_coco_karpathy_and_csv(tmp_path):
    karpathy = {"images": [
        {"filepath": "train2014", "filename": "a.jpg", "split": "train", "sentences": [{"raw": "A cat. "}, {"raw": "Cat."}]},
        {"filepath": "val2014", "filename": "b.jpg", "split": "restval", "sentences": [{"raw": "A dog."}]},
        {"filepath": "val2014", "filename": "c.jpg", "split": "test", "sentences": [{"raw": "A cow."}]},
        {"filepath": "val2014", "split": "test"},  # malformed
    ]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy))
    train_split = read_dataset(tmp_path / "dataset_coco.json", split="train")
    assert [(r.image, r.captions) for r in train_split.records] == [
        ("train2014/a.jpg", ["A cat.", "Cat."]), ("val2014/b.jpg", ["A dog."])]
    assert [r.image for r in read_dataset(tmp_path / "dataset_coco.json", split="test").records] == ["val2014/c.jpg"]
    assert len(train_split.report.skipped_rows) == 1

    coco = {"images": [{"id": 1, "file_name": "x.jpg"}, {"id": 2, "file_name": "y.jpg"}],
            "annotations": [{"image_id": 1, "caption": "one"}, {"image_id": 2, "caption": "two"},
                            {"image_id": 1, "caption": "uno"}, {"image_id": 9, "caption": "orphan"}]}
    (tmp_path / "captions_val2014.json").write_text(json.dumps(coco))
    read = read_dataset(tmp_path / "captions_val2014.json")
    assert [(r.image, r.captions) for r in read.records] == [("x.jpg", ["one", "uno"]), ("y.jpg", ["two"])]
    assert len(read.report.skipped_rows) == 1

    (tmp_path / "pairs.csv").write_text('image,caption\nx.jpg,"a cat, asleep."\n,missing image\ny.jpg,a dog.\n')
    read = read_dataset(tmp_path / "pairs.csv")
    assert [(r.image, r.captions) for r in read.records] == [("x.jpg", ["a cat, asleep."]), ("y.jpg", ["a dog."])]
    assert read.report.skipped_rows == ["line 3: no 'image' path"]

    (tmp_path / "bad.csv").write_text("path,text\nx.jpg,a cat\n")
    with pytest.raises(DatasetError, match="'image' and 'caption'"):
        read_dataset(tmp_path / "bad.csv")
    with pytest.raises(DatasetError, match="not found"):
        read_dataset(tmp_path / "nope.jsonl")


def test_features_of_another_tower_are_refused(data, clip_source, feature_dir, tmp_path):
    config = ExtractConfig(data=data / "canonical.jsonl", image_root=data, out=feature_dir, clip=clip_source)
    assert extract_features(config).embedded == 0  # the same tower: everything is cached already
    (tmp_path / "pre.json").write_text(json.dumps({"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}))
    for other in (ClipSource(model=clip_source.model),  # same architecture, random weights
                  ClipSource(model=clip_source.model, weights=clip_source.weights, preprocess=tmp_path / "pre.json")):
        config.clip = other
        with pytest.raises(BundleError, match="another CLIP tower"):
            extract_features(config)
    (tmp_path / "pre.json").write_text(json.dumps({"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3,
                                                   "interpolation": "bilinear"}))
    with pytest.raises(BundleError, match="bicubic"):
        load_clip_tower(config.clip)


def test_caption_loss_counts_real_tokens_only():
    tokens, mask = pad_batch([[5, 0, 7], [3]])  # id 0 is a real token in row 0 and padding in row 1
    assert tokens.tolist() == [[5, 0, 7], [3, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 10)
    expected = torch.nn.functional.cross_entropy(
        torch.stack([logits[0, 0], logits[0, 1], logits[0, 2], logits[1, 0]]), torch.tensor([5, 0, 7, 3]))
    assert torch.allclose(caption_loss(logits, tokens, mask), expected)
    garbage = logits.clone()
    garbage[1, 1:] = 100.0 * torch.randn(2, 10)  # padded positions do not matter
    assert torch.allclose(caption_loss(garbage, tokens, mask), expected)


def test_training_loss_falls_and_writes_a_bundle(feature_dir, tmp_path):
    result = train(TrainConfig(features=feature_dir, out=tmp_path / "run", epochs=4, **TINY_MODEL))
    epochs = result.log["epochs"]
    assert len(epochs) == 4
    assert epochs[-1]["train_loss"] < 0.75 * epochs[0]["train_loss"]
    assert epochs[-1]["val_loss"] < epochs[0]["val_loss"]
    for name in ("metrics.json", "loss.png", "clipcap.json", "model.safetensors", "tokenizer.json"):
        assert (tmp_path / "run" / name).is_file(), name
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["epoch-003.pt", "epoch-004.pt"]
    bundle = load_bundle(tmp_path / "run")
    assert bundle.config.train_clip is False and bundle.config.mapper.type == "mlp"
    # The bundle's CLIP tower is the one the features were made with.
    cached = load_features(feature_dir).clip_weights()
    assert all(torch.equal(bundle.model.clip.state_dict()[k], v) for k, v in cached.items())
    # Every training caption ends with end-of-text.
    trainer_examples = Trainer(TrainConfig(features=feature_dir, out=tmp_path / "again", epochs=1, **TINY_MODEL))
    assert all(t[-1] == trainer_examples.tokenizer.eos_token_id for t in trainer_examples.train.tokens)


def test_resume_continues_exactly(feature_dir, tmp_path):
    straight = train(TrainConfig(features=feature_dir, out=tmp_path / "straight", epochs=2, **TINY_MODEL))
    resumed = train(TrainConfig(features=feature_dir, out=tmp_path / "resumed",
                                resume=tmp_path / "straight" / "checkpoints" / "epoch-001.pt"))
    a, b = load_bundle(straight.bundle).model.state_dict(), load_bundle(resumed.bundle).model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert resumed.log == straight.log | {"epochs": resumed.log["epochs"]}
    assert [e["train_loss"] for e in resumed.log["epochs"]] == [e["train_loss"] for e in straight.log["epochs"]]


def save_pretrained_gpt2(folder, feature_dir):
    """A tiny 'pretrained' GPT-2 and its tokenizer in transformers' save_pretrained layout (as `--gpt2 DIR`)."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from clipcap.tokenizer import train_bpe

    captions = [c for r in load_features(feature_dir).records for c in r.captions]
    train_bpe(captions, vocab_size=300).save(folder / "source-tokenizer.json")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "source-tokenizer.json"), eos_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(1)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=40, n_embd=64, n_layer=2, n_head=1))
    model.save_pretrained(folder)
    return model.state_dict()


def test_transformer_variant_leaves_gpt2_bit_identical(feature_dir, tmp_path):
    pretrained = save_pretrained_gpt2(tmp_path, feature_dir)
    settings = {k: v for k, v in TINY_MODEL.items() if not k.startswith(("gpt2", "bpe_"))}
    trainer = Trainer(TrainConfig(features=feature_dir, out=tmp_path / "t", mapper="transformer", epochs=2,
                                  gpt2=str(tmp_path), **settings))
    gpt_before = {k: v.clone() for k, v in trainer.model.gpt.state_dict().items()}
    assert all(torch.equal(v, pretrained[k]) for k, v in gpt_before.items())  # started from the given GPT-2
    assert trainer.config.gpt2.n_layer == 2 and trainer.tokenizer.vocab_size == trainer.config.gpt2.vocab_size
    mapper_before = {k: v.clone() for k, v in trainer.model.clip_project.state_dict().items()}
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in trainer.model.clip_project.parameters()}
    result = trainer.fit()
    assert result.log["epochs"][-1]["train_loss"] < result.log["epochs"][0]["train_loss"]
    after = load_bundle(result.bundle).model
    assert all(torch.equal(v, after.gpt.state_dict()[k]) for k, v in gpt_before.items())
    assert any(not torch.equal(v, after.clip_project.state_dict()[k]) for k, v in mapper_before.items())


def test_train_clip_updates_the_tower_and_is_recorded(feature_dir, tmp_path):
    result = train(TrainConfig(features=feature_dir, out=tmp_path / "c", train_clip=True, epochs=1, **TINY_MODEL))
    bundle = load_bundle(result.bundle)
    assert bundle.config.train_clip is True
    cached = load_features(feature_dir).clip_weights()
    assert any(not torch.equal(bundle.model.clip.state_dict()[k], v) for k, v in cached.items())


def test_train_clip_keeps_a_fixed_sin_cos_position_embedding_fixed(tiny_tokenizer):
    """The demo CLIP uses open_clip's fixed 2-D sin-cos positions; --train-clip must not start training them."""
    config = tiny_config(tiny_tokenizer)
    sin_cos = {**CONFTEST_CLIP, "vision_cfg": {**CONFTEST_CLIP["vision_cfg"], "pos_embed_type": "sin_cos_2d"}}
    model = ClipCapModel(dataclasses.replace(config, clip=dataclasses.replace(config.clip, model_config=sin_cos)))
    trainable = {id(p) for p in trainable_parameters(model, TrainConfig(features=None, out=None, train_clip=True))}
    assert id(model.clip.positional_embedding) not in trainable
    assert not model.clip.positional_embedding.requires_grad
    assert id(model.clip.conv1.weight) in trainable and id(model.clip.class_embedding) in trainable


# -- what a run starts from, and what it keeps --------------------------------------------------------------


def _train_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "training" / "train.py"
    spec = importlib.util.spec_from_file_location("clipcap_train_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpt2_is_pretrained_by_default_and_random_only_by_name(feature_dir, tmp_path, no_network, capsys):
    """No --gpt2: the paper's pretrained `gpt2`, refused offline with the hub's clear error before any work;
    the random sizes need --gpt2 random, which alone trains from random weights."""
    script = _train_script()
    assert TrainConfig(features=None, out=None).gpt2 == "gpt2"
    assert script.main(["--features", str(feature_dir), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --gpt2: ") and "Traceback" not in err
    assert not (tmp_path / "m" / "model.safetensors").exists()
    with pytest.raises(SystemExit) as refused:
        script.main(["--features", str(feature_dir), "--out", str(tmp_path / "m"), "--gpt2-layers", "1"])
    assert refused.value.code == 2 and "--gpt2-layers sizes a random GPT-2: it needs --gpt2 random" in capsys.readouterr().err


def test_warm_up_longer_than_the_run_is_a_warning(feature_dir, tmp_path, capsys):
    settings = {**TINY_MODEL, "warmup_steps": 1000}
    trainer = Trainer(TrainConfig(features=feature_dir, out=tmp_path / "w", epochs=1, **settings))
    total = trainer.steps_per_epoch
    assert f"warning: 1000 warm-up steps, longer than the whole run ({total} steps" in capsys.readouterr().err
    Trainer(TrainConfig(features=feature_dir, out=tmp_path / "ok", epochs=1, **{**TINY_MODEL, "warmup_steps": total}))
    assert "warning" not in capsys.readouterr().err


def test_the_bundle_is_the_best_epoch_by_validation_loss(feature_dir, tmp_path, monkeypatch):
    """Validation losses scripted 3, 1, 2: the bundle holds epoch 2's weights (checkpoint epoch-002), not epoch 3's."""
    losses = iter([3.0, 1.0, 2.0])
    monkeypatch.setattr(Trainer, "validation_loss", lambda self: next(losses))
    result = train(TrainConfig(features=feature_dir, out=tmp_path / "b", epochs=3, keep_checkpoints=3, **TINY_MODEL))
    assert result.log["bundle_epoch"] == 2
    bundle = load_bundle(tmp_path / "b").model.state_dict()
    for epoch, same in ((2, True), (3, False)):
        saved = torch.load(tmp_path / "b" / "checkpoints" / f"epoch-{epoch:03d}.pt", weights_only=True)["model"]
        assert all(torch.equal(bundle[k], saved[k]) for k in saved if k.startswith("clip_project.")) == same, epoch

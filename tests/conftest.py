"""Shared fixtures: tiny ClipCap bundles built in the test session (no downloads)."""
from __future__ import annotations

import io
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from clipcap.config import ClipCapConfig, ClipConfig, GPT2Config, MapperConfig, TokenizerConfig
from clipcap.model import ClipCapModel
from clipcap.tokenizer import CaptionTokenizer, train_bpe

def pytest_collection_modifyitems(config, items):
    """`timing` tests measure real time (their verdicts depend on the machine's load): they run only when
    asked for by marker (`-m timing`), never in the default suite."""
    if "timing" in (config.getoption("markexpr") or ""):
        return
    deselected = [item for item in items if "timing" in item.keywords]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if "timing" not in item.keywords]


# A tiny open_clip architecture (the same keys as open_clip's model_configs/*.json).
TINY_CLIP = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}
CAPTIONS = [
    "a small red circle.", "a large blue square.", "a green triangle to the left of a purple circle.",
    "a yellow square above an orange triangle.", "a dog runs on the grass.", "two cats sleep on a sofa.",
]


def max_diff(a, b) -> float:
    """max |a - b| of two arrays, each numpy (onnxruntime on the CPU) or torch (on any device)."""
    from clipcap.arrays import to_numpy

    return float(np.abs(to_numpy(a) - to_numpy(b)).max())


@pytest.fixture(scope="session")
def tiny_tokenizer() -> CaptionTokenizer:
    return train_bpe(CAPTIONS * 4, vocab_size=300)


def tiny_config(tokenizer: CaptionTokenizer, mapper: str = "mlp", normalize_prefix: bool = False) -> ClipCapConfig:
    return ClipCapConfig(
        clip=ClipConfig(model_name="tiny", model_config=TINY_CLIP, image_size=32, embed_dim=24),
        mapper=MapperConfig(type=mapper, prefix_length=4, clip_length=3, num_layers=2, num_heads=8),
        gpt2=GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=64, n_embd=64, n_layer=2, n_head=1),
        tokenizer=TokenizerConfig(eos_token_id=tokenizer.eos_token_id, stop_token_ids=tokenizer.stop_token_ids()),
        normalize_prefix=normalize_prefix,
        max_tokens=24,
    ).validate()


def tiny_model(tokenizer: CaptionTokenizer, mapper: str = "mlp", seed: int = 0, steps: int = 40,
               **kwargs) -> ClipCapModel:
    """A tiny model, briefly fitted to caption `random_images(len(CAPTIONS))` with CAPTIONS.

    Random weights never emit the stop token; a few steps of fitting give captions of different
    lengths, which the batching and stopping tests need.
    """
    from clipcap.images import preprocess

    torch.manual_seed(seed)
    model = ClipCapModel(tiny_config(tokenizer, mapper, **kwargs))
    clip = model.config.clip
    pixels = torch.from_numpy(preprocess(random_images(len(CAPTIONS)), clip.image_size, clip.mean, clip.std))
    encoded = [tokenizer.encode(c) + [tokenizer.eos_token_id] for c in CAPTIONS]
    width = max(map(len, encoded))
    tokens = torch.tensor([ids + [0] * (width - len(ids)) for ids in encoded])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in encoded])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        logits = model(model.encode(pixels), tokens, mask)
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")
        loss = (loss * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def write_paper_checkpoint(path, tokenizer: CaptionTokenizer, embed_dim: int = 24):
    """A checkpoint in the paper code's layout (mapper + GPT-2, no CLIP) of a tiny model whose mapper takes
    `embed_dim`-wide CLIP embeddings (512: ViT-B-32's)."""
    config = tiny_config(tokenizer)
    config.clip.model_config = {**TINY_CLIP, "embed_dim": embed_dim}
    config.clip.embed_dim = embed_dim
    torch.manual_seed(0)
    state = {k: v for k, v in ClipCapModel(config.validate()).state_dict().items() if not k.startswith("clip.")}
    torch.save(state, path)
    return str(path)


def write_gpt2_folder(out, tokenizer: CaptionTokenizer):
    """A GPT-2-family model folder as the hub has them (config.json, weights, the tokenizer's own files),
    a tiny random GPT-2 for `tokenizer`: what `train.py --gpt2 FOLDER` takes."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    GPT2LMHeadModel(GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=64, n_embd=64, n_layer=2, n_head=1,
                               bos_token_id=eos, eos_token_id=eos)).save_pretrained(out)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer._tok, eos_token=tokenizer.eos_token).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_tokenizer):
    from clipcap.formats.model_bundle import save_bundle

    return save_bundle(tiny_model(tiny_tokenizer), tiny_tokenizer, tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="session")
def tiny_transformer_bundle(tmp_path_factory, tiny_tokenizer):
    from clipcap.formats.model_bundle import save_bundle

    model = tiny_model(tiny_tokenizer, "transformer", normalize_prefix=True)
    return save_bundle(model, tiny_tokenizer, tmp_path_factory.mktemp("bundle") / "tiny-transformer")


def random_images(count: int, seed: int = 0, size: int = 48) -> list[Image.Image]:
    """Noisy images of clearly different base colours, so even a tiny CLIP tells them apart."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        base = rng.integers(0, 256, 3)
        noise = rng.integers(-30, 31, (size, size, 3))
        images.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)))
    return images


def png_bytes(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


# Export fixtures: each bundle is exported once per test session.


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, tiny_bundle):
    from clipcap.export.onnx import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("export") / "tiny-onnx"
    export_bundle(tiny_bundle, ExportOptions(out=out))
    return out


@pytest.fixture(scope="session")
def tiny_concat_export(tmp_path_factory, tiny_bundle):
    """The portable decoder (GPT-2's own attention, cache by concatenation): what TensorRT builds from."""
    from clipcap.export.onnx import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("export") / "tiny-onnx-concat"
    export_bundle(tiny_bundle, ExportOptions(out=out, decoder_cache="concat"))
    return out


@pytest.fixture(scope="session")
def full_size_bundle(tmp_path_factory, tiny_tokenizer):
    """ViT-B-32 + GPT-2 small with random weights and a tiny BPE (ids far below GPT-2's 50257)."""
    from clipcap.formats.model_bundle import save_bundle
    from clipcap.model import resolve_clip_config

    torch.manual_seed(0)
    tokens = TokenizerConfig(eos_token_id=tiny_tokenizer.eos_token_id, stop_token_ids=tiny_tokenizer.stop_token_ids())
    model = ClipCapModel(ClipCapConfig(clip=resolve_clip_config("ViT-B-32"), tokenizer=tokens).validate())
    return save_bundle(model.eval(), tiny_tokenizer, tmp_path_factory.mktemp("bundle") / "full-size")


@pytest.fixture(scope="session")
def full_size_export(tmp_path_factory, full_size_bundle):
    """~1.2 GB of ONNX and ~2.5 minutes on 2 CPU cores, once per session."""
    from clipcap.export.onnx import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("export") / "full-size-onnx"
    export_bundle(full_size_bundle, ExportOptions(out=out))
    return out


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """An empty Hugging Face cache and a machine where every connection attempt fails (and is counted)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise socket.gaierror(socket.EAI_NONAME, "no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts

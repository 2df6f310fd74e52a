"""Model bundles: a directory with `clipcap.json`, `model.safetensors` and `tokenizer.json`.

`load_bundle` / `save_bundle` are the only way weights enter or leave the library, and they go
through safetensors. The schema of `clipcap.json` is clipcap.config's dataclasses.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from clipcap.config import CONFIG_FILE, BundleError, ClipCapConfig
from clipcap.formats.export_bundle import MANIFEST_FILE
from clipcap.tokenizer import CaptionTokenizer

if TYPE_CHECKING:  # the model and its weights need torch (the `torch` extra); config and tokenizer do not
    import torch

    from clipcap.model import ClipCapModel

WEIGHTS_FILE = "model.safetensors"


@dataclass
class Bundle:
    path: Path | None
    config: ClipCapConfig
    model: ClipCapModel
    tokenizer: CaptionTokenizer


def load_config(path: str | Path) -> ClipCapConfig:
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: bundle directory not found")
    return ClipCapConfig.load(path / CONFIG_FILE)


def load_tokenizer(path: str | Path, config: ClipCapConfig) -> CaptionTokenizer:
    tokenizer = CaptionTokenizer.from_file(Path(path) / config.tokenizer.file)
    if tokenizer.vocab_size > config.gpt2.vocab_size:
        raise BundleError(f"{Path(path) / config.tokenizer.file}: {tokenizer.vocab_size} tokens, more than "
                          f"gpt2.vocab_size={config.gpt2.vocab_size} in {CONFIG_FILE}")
    return tokenizer


def load_model(path: str | Path, config: ClipCapConfig) -> ClipCapModel:
    """The model described by `config` (the bundle's clipcap.json, read by the caller) with its weights."""
    path = Path(path)
    if not (path / WEIGHTS_FILE).is_file() and (path / MANIFEST_FILE).is_file():
        raise BundleError(f"{path}: an export bundle ({MANIFEST_FILE}: ONNX graphs or TensorRT engines, no PyTorch "
                          f"weights), where a model bundle ({CONFIG_FILE} + {WEIGHTS_FILE} + tokenizer) is needed: "
                          f"pass the model bundle it was exported from (e.g. models/shapes-demo)")
    try:
        from clipcap.model import ClipCapModel
    except ImportError as error:
        raise BundleError(f"{path}: a model bundle needs PyTorch ({error}); install the torch extra: "
                          f"pip install 'clipcap-deploy[torch]' (an export bundle runs without it)") from None
    model = ClipCapModel(config)
    load_weights(model, Path(path) / WEIGHTS_FILE)
    return model.eval()


def load_bundle(path: str | Path) -> Bundle:
    path = Path(path)
    config = load_config(path)
    tokenizer = load_tokenizer(path, config)
    return Bundle(path, config, load_model(path, config), tokenizer)


def save_bundle(model: ClipCapModel, tokenizer: CaptionTokenizer, path: str | Path) -> Path:
    from safetensors.torch import save_model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.validate()
    model.config.save(path / CONFIG_FILE)
    tokenizer.save(path / model.config.tokenizer.file)
    save_model(model, str(path / WEIGHTS_FILE))  # drops the tied lm_head alias; load re-ties it
    return path


def load_weights(model: torch.nn.Module, weights_file: Path) -> None:
    """Load safetensors weights, checking every name and shape against the model first."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not weights_file.is_file():
        raise BundleError(f"{weights_file}: file not found")
    try:
        state = load_file(str(weights_file))
    except (SafetensorError, OSError) as error:
        raise BundleError(f"{weights_file}: not a readable safetensors file ({error})") from None
    check_state_dict(model, state, str(weights_file))
    model.load_state_dict(state, strict=False)  # strictness already checked, tied aliases excepted


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str,
                     allow_missing: tuple[str, ...] = ()) -> None:
    expected = model.state_dict()
    tied = _tied_present(model, state)
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(k for k in set(expected) - set(state) - tied if not k.startswith(allow_missing))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    problems = []
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) of the wrong shape, e.g. {'; '.join(wrong[:3])}")
    if missing:
        problems.append(f"{len(missing)} missing, e.g. {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected, e.g. {', '.join(unexpected[:3])}")
    if problems:
        raise BundleError(f"{where}: weights do not match the model described by {CONFIG_FILE}: "
                          + "; ".join(problems))


def _tied_present(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> set[str]:
    """Names that share storage with a name present in `state` (GPT-2's lm_head.weight and wte):
    safetensors stores such a tensor once, under one of its names."""
    groups: dict[tuple, list[str]] = {}
    for name, tensor in model.state_dict().items():
        groups.setdefault((tensor.data_ptr(), tensor.shape), []).append(name)
    return {name for names in groups.values() if len(names) > 1 and set(names) & set(state) for name in names}

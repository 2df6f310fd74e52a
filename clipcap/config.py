"""The model bundle schema (`clipcap.json`) as dataclasses, with validation that names the bad field.

Every key in `clipcap.json` maps one to one onto a field here; a bundle rebuilds from this file,
its tokenizer and its weights alone.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


FORMAT_VERSION = 1
CONFIG_FILE = "clipcap.json"


class BundleError(ValueError):
    """A bundle (or one of its files) is missing, malformed or inconsistent. The message says where."""


@dataclass
class ClipConfig:
    """The frozen CLIP image tower (open_clip)."""

    model_name: str = "ViT-B-32"  # open_clip architecture name, informational once model_config is set
    model_config: dict | None = None  # full open_clip config dict; rebuilds the tower without the registry
    pretrained: str | None = None  # open_clip weights tag used at build time ('openai'); bundle weights win
    image_size: int = 224  # square input side, pixels
    mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])  # OpenAI CLIP
    std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    embed_dim: int = 512  # CLIP image embedding width = the mapper's prefix_size; read from the model

    def validate(self, where: str) -> None:
        _check(self.image_size > 0, where, "clip.image_size", "must be > 0")
        _check(len(self.mean) == 3 and all(map(math.isfinite, self.mean)), where, "clip.mean",
               "needs 3 finite values (one per RGB channel)")
        _check(len(self.std) == 3 and all(math.isfinite(s) and s > 0 for s in self.std), where, "clip.std",
               "needs 3 finite values > 0 (one per RGB channel)")
        _check(self.embed_dim > 0, where, "clip.embed_dim", "must be > 0")
        self._validate_tower(where)

    def _validate_tower(self, where: str) -> None:
        """The open_clip config must produce what the rest of the bundle expects: `embed_dim`-wide
        embeddings of `image_size` images. Of the tower's own sizes, the ViT ones that make it unbuildable
        are checked; the rest of the dict is open_clip's schema."""
        tower = self.model_config
        if tower is None:
            from open_clip import get_model_config  # only bundles without a model_config need the registry

            tower = get_model_config(self.model_name)
            _check(tower is not None, where, "clip.model_config",
                   f"is null and clip.model_name {self.model_name!r} is not an open_clip model")
            name = f"open_clip's {self.model_name}"
        else:
            name = "clip.model_config"
        _check(isinstance(tower.get("embed_dim"), int), where, f"{name}.embed_dim", "must be an integer")
        _check(isinstance(tower.get("vision_cfg"), dict), where, f"{name}.vision_cfg", "must be an object")
        _check(tower["embed_dim"] == self.embed_dim, where, "clip.embed_dim",
               f"is {self.embed_dim} but {name}.embed_dim, the tower's output width, is {tower['embed_dim']}")
        vision = tower["vision_cfg"]
        size = vision.get("image_size", 224)  # open_clip's default
        _check(size in (self.image_size, [self.image_size] * 2), where, "clip.image_size",
               f"is {self.image_size} but {name}.vision_cfg.image_size is {size}")
        if isinstance(vision.get("layers", 12), int) and "timm_model_name" not in vision:  # a ViT
            defaults = {"layers": 12, "width": 768, "patch_size": 16, "head_width": 64}  # open_clip's
            for key, default in defaults.items():
                value = vision.get(key, default)
                _check(isinstance(value, int) and not isinstance(value, bool), where, f"{name}.vision_cfg.{key}",
                       f"must be an integer, got {value!r}")
            layers, width, patch, head_width = (vision.get(key, default) for key, default in defaults.items())
            _check(layers > 0, where, f"{name}.vision_cfg.layers", "must be > 0")
            _check(0 < patch <= self.image_size, where, f"{name}.vision_cfg.patch_size",
                   f"must be in 1..clip.image_size ({self.image_size})")
            _check(0 < head_width <= width, where, f"{name}.vision_cfg.head_width",
                   f"must be in 1..{name}.vision_cfg.width ({width})")
            _check(width % (width // head_width) == 0, where, f"{name}.vision_cfg.head_width",
                   f"gives {width // head_width} heads, which must divide {name}.vision_cfg.width ({width})")


# The registry, the one list of mapper types: `mapper.type` in clipcap.json names one of these, each the
# class of clipcap.mappers that builds it (named here, so a bundle is validated without importing torch).
MAPPER_CLASSES = {"mlp": "MLPMapper", "transformer": "TransformerMapper"}


@dataclass
class MapperConfig:
    """The mapping network from one CLIP embedding to `prefix_length` GPT-2 input embeddings."""

    type: str = "mlp"  # 'mlp' (paper: GPT-2 fine-tuned) or 'transformer' (paper: GPT-2 frozen)
    prefix_length: int = 10  # GPT-2 input embeddings produced per image
    clip_length: int = 10  # transformer only: tokens the CLIP embedding is projected to
    num_layers: int = 8  # transformer only
    num_heads: int = 8  # transformer only; the paper uses 8
    mlp_ratio: float = 2.0  # transformer only: hidden width of its ReLU MLP / embedding width

    def validate(self, where: str) -> None:
        _check(self.type in MAPPER_CLASSES, where, "mapper.type",
               f"unknown mapper {self.type!r}; known: {sorted(MAPPER_CLASSES)}")
        for name in ("prefix_length", "clip_length", "num_layers", "num_heads"):
            _check(getattr(self, name) > 0, where, f"mapper.{name}", "must be > 0")
        _check(math.isfinite(self.mlp_ratio) and self.mlp_ratio > 0, where, "mapper.mlp_ratio",
               "must be finite and > 0")

    def validate_width(self, width: int, where: str) -> None:
        """Checks against the width E of the GPT-2 embeddings the mapper produces (gpt2.n_embd)."""
        if self.type == "mlp":
            _check(width * self.prefix_length // 2 > 0, where, "mapper.prefix_length",
                   f"times gpt2.n_embd ({width}) must be >= 2: the MLP's hidden width is their product / 2")
        if self.type == "transformer":
            _check(width % self.num_heads == 0, where, "mapper.num_heads",
                   f"must divide gpt2.n_embd ({width}), the transformer mapper's width")
            _check(int(width * self.mlp_ratio) > 0, where, "mapper.mlp_ratio",
                   f"times gpt2.n_embd ({width}) must be >= 1: it is the width of the mapper's MLP")


@dataclass
class GPT2Config:
    """GPT-2 dimensions; stored explicitly so a bundle never needs the hub to rebuild."""

    vocab_size: int = 50257
    n_positions: int = 1024  # longest prefix + caption the model can attend over
    n_embd: int = 768  # E: also the width of every prefix embedding
    n_layer: int = 12
    n_head: int = 12

    def validate(self, where: str) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            _check(getattr(self, name) > 0, where, f"gpt2.{name}", "must be > 0")
        _check(self.n_embd % self.n_head == 0, where, "gpt2.n_head", "must divide gpt2.n_embd")


@dataclass
class TokenizerConfig:
    """Which file holds the tokenizer and which ids end a caption."""

    file: str = "tokenizer.json"  # a `tokenizers` JSON file inside the bundle
    eos_token_id: int = 50256  # appended to training captions (GPT-2's <|endoftext|>)
    stop_token_ids: list[int] = field(default_factory=lambda: [13, 50256])  # '.' (as the paper) and eos

    def validate(self, where: str) -> None:
        _check(bool(self.file) and Path(self.file).name == self.file and self.file not in (".", ".."), where,
               "tokenizer.file", f"must be a file name inside the bundle, got {self.file!r}")
        _check(bool(self.stop_token_ids), where, "tokenizer.stop_token_ids", "must not be empty")


@dataclass
class ClipCapConfig:
    """Everything needed to rebuild a ClipCap model: the contents of `clipcap.json`."""

    clip: ClipConfig = field(default_factory=ClipConfig)
    mapper: MapperConfig = field(default_factory=MapperConfig)
    gpt2: GPT2Config = field(default_factory=GPT2Config)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    normalize_prefix: bool = False  # L2-normalise the CLIP embedding before the mapper
    train_clip: bool = False  # recorded: was the CLIP tower updated by the caption loss in training
    max_tokens: int = 67  # default caption length limit (the paper's entry_length)
    format_version: int = FORMAT_VERSION

    @property
    def token_limit(self) -> int:
        """The most tokens GPT-2's positions allow after the prefix."""
        return self.gpt2.n_positions - self.mapper.prefix_length

    def validate(self, where: str = CONFIG_FILE) -> "ClipCapConfig":
        _check(self.format_version == FORMAT_VERSION, where, "format_version",
               f"unsupported version {self.format_version}; this library reads {FORMAT_VERSION}")
        self.clip.validate(where)
        self.mapper.validate(where)
        self.gpt2.validate(where)
        self.tokenizer.validate(where)
        self.mapper.validate_width(self.gpt2.n_embd, where)
        _check(0 < self.max_tokens, where, "max_tokens", "must be > 0")
        _check(self.mapper.prefix_length + self.max_tokens <= self.gpt2.n_positions, where, "max_tokens",
               f"plus mapper.prefix_length ({self.mapper.prefix_length}) exceeds gpt2.n_positions "
               f"({self.gpt2.n_positions})")
        ids = [("tokenizer.eos_token_id", self.tokenizer.eos_token_id)]
        ids += [("tokenizer.stop_token_ids", token_id) for token_id in self.tokenizer.stop_token_ids]
        for name, token_id in ids:
            _check(0 <= token_id < self.gpt2.vocab_size, where, name,
                   f"id {token_id} outside the vocabulary (gpt2.vocab_size {self.gpt2.vocab_size})")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = CONFIG_FILE) -> "ClipCapConfig":
        return dataclass_from_dict(cls, data, where, prefix="").validate(where)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ClipCapConfig":
        path = Path(path)
        if not path.is_file():
            raise BundleError(f"{path}: file not found")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BundleError(f"{path}: not valid JSON ({error})") from None
        return cls.from_dict(data, where=str(path))


def _check(ok: bool, where: str, field_name: str, message: str) -> None:
    if not ok:
        raise BundleError(f"{where}: field '{field_name}' {message}")


def dataclass_from_dict(cls, data: Any, where: str, prefix: str):
    """Build dataclass `cls` from a dict, rejecting unknown keys and values of the wrong type."""
    section = prefix.rstrip(".") or "top level"
    if not isinstance(data, dict):
        raise BundleError(f"{where}: field '{section}' must be a JSON object")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise BundleError(f"{where}: unknown field(s) {', '.join(prefix + u for u in unknown)}")
    missing = [name for name, f in fields.items() if name not in data and _default(f) is dataclasses.MISSING]
    if missing:
        raise BundleError(f"{where}: missing field(s) {', '.join(prefix + m for m in missing)} (no default)")
    values = {}
    for name, value in data.items():
        default = _default(fields[name])
        if dataclasses.is_dataclass(default):
            values[name] = dataclass_from_dict(type(default), value, where, prefix + name + ".")
        else:
            values[name] = _coerce(value, default, where, prefix + name, fields[name].type)
    return cls(**values)


def _default(f: dataclasses.Field) -> Any:
    """A field's default value (a fresh one from its factory), or MISSING for a required field."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _coerce(value: Any, default: Any, where: str, name: str, annotation: str) -> Any:
    optional = "None" in str(annotation)
    if value is None:
        _check(optional, where, name, "must not be null")
        return None
    expected = {"str": str, "int": int, "float": (int, float), "bool": bool, "list": list, "dict": dict}
    kind = next((k for k in expected if str(annotation).startswith(k)), None)
    ok = isinstance(value, expected[kind]) if kind else True
    if kind in ("int", "float") and isinstance(value, bool):
        ok = False  # JSON true is not a number
    _check(ok, where, name, f"must be {kind}, got {type(value).__name__} {value!r}")
    if kind == "float":
        return float(value)
    if isinstance(default, list) and default and isinstance(default[0], float):
        _check(all(isinstance(v, (int, float)) for v in value), where, name, "must be a list of numbers")
        return [float(v) for v in value]
    if isinstance(default, list) and default and isinstance(default[0], int):
        _check(all(isinstance(v, int) and not isinstance(v, bool) for v in value), where, name,
               "must be a list of integers")
    return value

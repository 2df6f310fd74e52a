"""`ClipCapModel`: CLIP image tower (open_clip) + mapping network + GPT-2 (transformers), one nn.Module.

State-dict layout: `clip.*` (the open_clip visual tower), `clip_project.*` (the mapper, the paper's
names), `gpt.*` (GPT2LMHeadModel, the paper's names). No decoding lives here: see decoding.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from clipcap.config import BundleError, ClipCapConfig, ClipConfig, GPT2Config
from clipcap.mappers import build_mapper


def resolve_clip_config(model: str, pretrained: str | None = None) -> ClipConfig:
    """A ClipConfig for an open_clip architecture name or a JSON model-config file.

    The full open_clip config dict is stored so the tower rebuilds without open_clip's registry.
    """
    import open_clip

    path = Path(model)
    if path.suffix == ".json":
        if not path.is_file():
            raise BundleError(f"{path}: CLIP model config file not found")
        model_config = json.loads(path.read_text())
        name = path.stem
    else:
        model_config = open_clip.get_model_config(model)
        if model_config is None:
            raise BundleError(f"unknown open_clip model {model!r}; see open_clip.list_models()")
        name = model
    if pretrained == "openai":
        model_config = {**model_config, "quick_gelu": True}  # OpenAI's weights were trained with QuickGELU
    vision = model_config["vision_cfg"]
    preprocess = model_config.get("preprocess_cfg", {})
    defaults = ClipConfig()
    return ClipConfig(
        model_name=name,
        model_config=model_config,
        pretrained=pretrained,
        image_size=int(vision.get("image_size", defaults.image_size)),
        mean=[float(v) for v in preprocess.get("mean", defaults.mean)],
        std=[float(v) for v in preprocess.get("std", defaults.std)],
        embed_dim=int(model_config["embed_dim"]),
    )


def build_clip_visual(config: ClipConfig) -> nn.Module:
    """The open_clip image tower of `config`, randomly initialised."""
    import open_clip

    cfg = config.model_config or open_clip.get_model_config(config.model_name)
    if cfg is None:
        raise BundleError(f"clip.model_config is empty and {config.model_name!r} is not an open_clip model")
    # _build_vision_tower builds the image tower alone: no text tower weights to allocate and drop.
    return open_clip.model._build_vision_tower(
        cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=cfg.get("quick_gelu", False)
    )


def load_clip_checkpoint(tower: nn.Module, config: ClipConfig, weights_file: str, flag: str) -> None:
    """Load a full open_clip checkpoint (both towers) into `tower`, the image tower built from `config`."""
    import open_clip

    cfg = config.model_config
    full = open_clip.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"],
                          quick_gelu=cfg.get("quick_gelu", False))
    try:
        open_clip.load_checkpoint(full, weights_file)  # safetensors or torch.load(weights_only=True)
    except Exception as error:  # unreadable file or weights of another architecture
        raise BundleError(f"{flag} {weights_file}: not open_clip weights for "
                          f"{config.model_name} ({str(error).splitlines()[0]})") from None
    tower.load_state_dict(full.visual.state_dict())


def pretrained_clip_tower(model: str, pretrained: str, flag: str = "--clip-pretrained") -> tuple[ClipConfig, nn.Module]:
    """The image tower of open_clip `model` with weights `pretrained`: a weights file, or a tag ('openai')
    resolved cache-first by clipcap.hub (offline: a BundleError naming `flag`)."""
    from clipcap.hub import clip_weights_file

    weights_file, quick_gelu = clip_weights_file(model, pretrained, flag)
    config = resolve_clip_config(model, Path(pretrained).name if Path(pretrained).is_file() else pretrained)
    if quick_gelu:  # the tag's weights were trained with QuickGELU (OpenAI's, some LAION ones): the tower must match
        config.model_config = {**config.model_config, "quick_gelu": True}
    tower = build_clip_visual(config)
    load_clip_checkpoint(tower, config, weights_file, flag)
    return config, tower


def gpt2_config_from_folder(folder: str) -> GPT2Config:
    """The dimensions of the GPT-2-family model in `folder` (its config.json; hub names: clipcap.hub first)."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(folder, local_files_only=True)
    if hf.model_type != "gpt2":
        raise BundleError(f"--gpt2 {folder}: model_type {hf.model_type!r}; ClipCap needs a GPT-2-family model "
                          "(model_type 'gpt2', any language and vocabulary)")
    return GPT2Config(vocab_size=hf.vocab_size, n_positions=hf.n_positions, n_embd=hf.n_embd,
                      n_layer=hf.n_layer, n_head=hf.n_head)


class ClipCapModel(nn.Module):
    def __init__(self, config: ClipCapConfig):
        super().__init__()
        from transformers import GPT2Config as HFGPT2Config, GPT2LMHeadModel

        self.config = config
        self.clip = build_clip_visual(config.clip)
        self.clip_project = build_mapper(config.clip.embed_dim, config.gpt2.n_embd, config.mapper)
        g = config.gpt2
        eos = config.tokenizer.eos_token_id
        self.gpt = GPT2LMHeadModel(HFGPT2Config(
            vocab_size=g.vocab_size, n_positions=g.n_positions, n_embd=g.n_embd, n_layer=g.n_layer,
            n_head=g.n_head, bos_token_id=eos, eos_token_id=eos,
        ))

    @property
    def prefix_length(self) -> int:
        return self.config.mapper.prefix_length

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, prefix_size) CLIP image embeddings."""
        return self.clip(pixels)

    def prefix(self, clip_embedding: torch.Tensor) -> torch.Tensor:
        """(B, prefix_size) CLIP embeddings -> (B, P, E) GPT-2 input embeddings."""
        if self.config.normalize_prefix:
            clip_embedding = clip_embedding / clip_embedding.norm(dim=-1, keepdim=True)
        return self.clip_project(clip_embedding.float())

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, P, E): the whole image side, the graph exported as encoder.onnx."""
        return self.prefix(self.encode_image(pixels))

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.gpt.transformer.wte(token_ids)  # (B, T) -> (B, T, E)

    def forward(self, prefix: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced caption logits: (B, P, E) prefix + (B, T) tokens -> (B, T, V).

        Row t holds the prediction *of* tokens[:, t]; `mask` (B, T) marks real caption tokens.
        """
        embeds = torch.cat((prefix, self.embed_tokens(tokens)), dim=1)  # (B, P+T, E)
        attention = None
        if mask is not None:
            ones = torch.ones(prefix.shape[:2], dtype=mask.dtype, device=mask.device)
            attention = torch.cat((ones, mask), dim=1)
        logits = self.gpt(inputs_embeds=embeds, attention_mask=attention).logits
        # Position P-1 (the last prefix slot) predicts the first caption token.
        return logits[:, self.prefix_length - 1 : -1]

"""Checkpoints of the paper's code (rmokady/CLIP_prefix_caption: `coco_weights.pt` and friends) read
into a model bundle: mapper type and every size from the tensor shapes, CLIP from open_clip.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from clipcap.config import BundleError, ClipCapConfig, GPT2Config, MapperConfig, TokenizerConfig
from clipcap.formats.model_bundle import Bundle, check_state_dict
from clipcap.hub import hub_file, looks_like_path
from clipcap.model import ClipCapModel, pretrained_clip_tower, resolve_clip_config
from clipcap.tokenizer import CaptionTokenizer

# Buffers that old transformers saved into GPT-2 checkpoints; current GPT-2 rebuilds them itself.
LEGACY_GPT2_BUFFERS = re.compile(r"\.attn\.(bias|masked_bias)$")
TOKENIZER_HINT = "a local tokenizer.json file or a folder holding GPT-2's tokenizer files"


def import_original(checkpoint: str | Path, clip_model: str = "ViT-B-32", clip_pretrained: str | None = "openai",
                    tokenizer: str = "gpt2", normalize_prefix: bool = False) -> Bundle:
    """A bundle from a checkpoint of the paper's code (`coco_weights.pt` and friends).

    Mapper type and every size are read from tensor shapes; CLIP comes from open_clip. Hub names
    (`clip_pretrained` tags, `tokenizer`) resolve from the local Hugging Face cache first; when absent,
    one short request to the hub decides, and an unreachable hub is a BundleError naming the flag.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise BundleError(f"{checkpoint}: file not found")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors come in many types; all mean "not a weights file"
        raise BundleError(f"{checkpoint}: not a loadable PyTorch weights file ({error})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BundleError(f"{checkpoint}: expected a state dict of tensors")
    state = {k: v for k, v in state.items() if not LEGACY_GPT2_BUFFERS.search(k)}
    gpt2, mapper, prefix_size = _infer_original_shapes(state, str(checkpoint))
    if clip_pretrained in (None, "none"):
        clip, tower = resolve_clip_config(clip_model), None
    else:
        clip, tower = pretrained_clip_tower(clip_model, clip_pretrained)
    if clip.embed_dim != prefix_size:
        raise BundleError(f"{checkpoint}: the mapper expects CLIP embeddings of size {prefix_size}, but "
                          f"{clip_model} produces {clip.embed_dim}; pick the CLIP model it was trained with")
    caption_tokenizer = _load_tokenizer(tokenizer)
    config = ClipCapConfig(
        clip=clip, mapper=mapper, gpt2=gpt2, normalize_prefix=normalize_prefix,
        max_tokens=min(ClipCapConfig.max_tokens, gpt2.n_positions - mapper.prefix_length),
        tokenizer=TokenizerConfig(eos_token_id=caption_tokenizer.eos_token_id,
                                  stop_token_ids=caption_tokenizer.stop_token_ids()),
    ).validate(str(checkpoint))
    model = ClipCapModel(config)
    if tower is not None:
        model.clip.load_state_dict(tower.state_dict())
    check_state_dict(model, state, str(checkpoint), allow_missing=("clip.",))
    model.load_state_dict(state, strict=False)
    return Bundle(None, config, model.eval(), caption_tokenizer)


def _load_tokenizer(name: str) -> CaptionTokenizer:
    """GPT-2's tokenizer from a tokenizer.json file, a folder, or a hub name (local cache first)."""
    path = Path(name)
    if path.is_file():
        return CaptionTokenizer.from_file(path)
    if path.is_dir():
        return CaptionTokenizer.from_folder(name)
    if looks_like_path(name):
        raise BundleError(f"--tokenizer: {name}: no such file or folder; pass {TOKENIZER_HINT}")
    return CaptionTokenizer.from_file(hub_file(name, ["tokenizer.json"], "--tokenizer", TOKENIZER_HINT))


def _infer_original_shapes(state: dict[str, torch.Tensor], where: str) -> tuple[GPT2Config, MapperConfig, int]:
    def need(key: str) -> torch.Tensor:
        if key not in state:
            raise BundleError(f"{where}: not a ClipCap checkpoint (no tensor {key!r})")
        return state[key]

    wte, wpe = need("gpt.transformer.wte.weight"), need("gpt.transformer.wpe.weight")
    embed = wte.shape[1]
    layers = {int(m.group(1)) for k in state if (m := re.match(r"gpt\.transformer\.h\.(\d+)\.", k))}
    # Every GPT-2 size uses 64-wide heads (the tests' tiny GPT-2 too).
    gpt2 = GPT2Config(vocab_size=wte.shape[0], n_positions=wpe.shape[0], n_embd=embed,
                      n_layer=len(layers), n_head=embed // 64)
    if "clip_project.model.0.weight" in state:
        first, last = state["clip_project.model.0.weight"], need("clip_project.model.2.weight")
        return gpt2, MapperConfig(type="mlp", prefix_length=last.shape[0] // embed), first.shape[1]
    linear = need("clip_project.linear.weight")
    mapper_layers = {int(m.group(1)) for k in state
                     if (m := re.match(r"clip_project\.transformer\.layers\.(\d+)\.", k))}
    fc1 = need("clip_project.transformer.layers.0.mlp.fc1.weight")
    mapper = MapperConfig(type="transformer", prefix_length=need("clip_project.prefix_const").shape[0],
                          clip_length=linear.shape[0] // embed, num_layers=len(mapper_layers),
                          mlp_ratio=fc1.shape[0] / embed)
    return gpt2, mapper, linear.shape[1]

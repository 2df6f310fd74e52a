"""Checkpoints of the paper's code (rmokady/CLIP_prefix_caption: `coco_weights.pt` and friends) read
into a model bundle: mapper type and every size from the tensor shapes, CLIP from open_clip.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from clipcap.config import BundleError, ClipCapConfig, GPT2Config, MapperConfig, TokenizerConfig
from clipcap.formats.model_bundle import Bundle, check_state_dict
from clipcap.model import ClipCapModel, resolve_clip_config
from clipcap.tokenizer import CaptionTokenizer

# Buffers that old transformers saved into GPT-2 checkpoints; current GPT-2 rebuilds them itself.
LEGACY_GPT2_BUFFERS = re.compile(r"\.attn\.(bias|masked_bias)$")
HUB_PROBE_TIMEOUT_S = 5  # one metadata request without retries: an offline machine gets its error at once
CLIP_WEIGHTS_HINT = ("a local open_clip weights file (.safetensors/.bin; OpenAI's weights also need "
                     "--clip-model ViT-B-32-quickgelu or the matching -quickgelu name), or 'none' for random "
                     "CLIP weights (the bundle then captions nothing sensible: only for tests or for "
                     "caption-embeddings with precomputed CLIP embeddings)")
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
    random_clip = clip_pretrained in (None, "none")
    weights_file, quick_gelu = (None, False) if random_clip else _clip_weights_file(clip_model, clip_pretrained)
    tag = None if random_clip else (Path(clip_pretrained).name if Path(clip_pretrained).is_file() else clip_pretrained)
    clip = resolve_clip_config(clip_model, tag)
    if quick_gelu:  # the tag's weights were trained with QuickGELU (OpenAI's, some LAION ones): the tower must match
        clip.model_config = {**clip.model_config, "quick_gelu": True}
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
    if weights_file is not None:
        _load_clip_tower(model, weights_file)
    check_state_dict(model, state, str(checkpoint), allow_missing=("clip.",))
    model.load_state_dict(state, strict=False)
    return Bundle(None, config, model.eval(), caption_tokenizer)


def _hub_file(repo_id: str, filenames: list[str], flag: str, hint: str) -> str:
    """A hub file's local path: from the cache when there, else downloaded after one short probe."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError

    for filename in filenames:
        cached = try_to_load_from_cache(repo_id, filename)
        if isinstance(cached, str):
            return cached
    for filename in filenames:
        try:
            get_hf_file_metadata(hf_hub_url(repo_id, filename), timeout=HUB_PROBE_TIMEOUT_S)
        except EntryNotFoundError as error:  # the hub answered: try the next file name
            reason = f"{type(error).__name__}: {str(error).splitlines()[0]}"
            continue
        except Exception as error:  # offline mode, no network, no such repo: no point asking again
            reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
            break
        return hf_hub_download(repo_id, filename)
    raise BundleError(f"{flag}: {repo_id}/{filename} is not in the local Hugging Face cache and cannot be "
                      f"fetched from the hub ({reason}); pass {flag} with {hint}")


def _clip_weights_file(clip_model: str, pretrained: str) -> tuple[str, bool]:
    """A local file of open_clip weights for a tag ('openai') or a path, and whether the tag needs QuickGELU."""
    import open_clip
    from open_clip.pretrained import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    if Path(pretrained).is_file():
        return pretrained, False  # the --clip-model name says it (the -quickgelu configs)
    source = open_clip.get_pretrained_cfg(clip_model, pretrained)
    if not source.get("hf_hub"):  # known tags all have one today; URL-only tags would wait on open_clip's download
        raise BundleError(f"--clip-pretrained: {pretrained!r} is neither a file nor an open_clip hub tag for "
                          f"{clip_model} (tags: {', '.join(open_clip.list_pretrained_tags_by_model(clip_model))}); "
                          f"pass {CLIP_WEIGHTS_HINT}")
    repo_id, filename = os.path.split(source["hf_hub"])  # open_clip's convention: a trailing '/' = default file
    filename = filename or HF_WEIGHTS_NAME
    names = [HF_SAFE_WEIGHTS_NAME, filename] if filename == HF_WEIGHTS_NAME else [filename]  # safetensors first
    return _hub_file(repo_id, names, "--clip-pretrained", CLIP_WEIGHTS_HINT), bool(source.get("quick_gelu"))


def _load_clip_tower(model: ClipCapModel, weights_file: str) -> None:
    """Load a full open_clip checkpoint into the bundle's image tower, built from its own model_config."""
    import open_clip

    tower = model.config.clip.model_config
    full = open_clip.CLIP(embed_dim=tower["embed_dim"], vision_cfg=tower["vision_cfg"], text_cfg=tower["text_cfg"],
                          quick_gelu=tower.get("quick_gelu", False))
    try:
        open_clip.load_checkpoint(full, weights_file)  # safetensors or torch.load(weights_only=True)
    except Exception as error:  # unreadable file or weights of another architecture
        raise BundleError(f"--clip-pretrained {weights_file}: not open_clip weights for "
                          f"{model.config.clip.model_name} ({str(error).splitlines()[0]})") from None
    model.clip.load_state_dict(full.visual.state_dict())


def _load_tokenizer(name: str) -> CaptionTokenizer:
    """GPT-2's tokenizer from a tokenizer.json file, a folder, or a hub name (local cache first)."""
    path = Path(name)
    if path.is_file():
        return CaptionTokenizer.from_file(path)
    if path.is_dir():
        return CaptionTokenizer.from_pretrained(name)
    if name.endswith(".json") or name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, not a repo id
        raise BundleError(f"--tokenizer: {name}: no such file or folder; pass {TOKENIZER_HINT}")
    return CaptionTokenizer.from_file(_hub_file(name, ["tokenizer.json"], "--tokenizer", TOKENIZER_HINT))


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

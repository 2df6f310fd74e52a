"""Hub names resolved to local files, one way for every script: the local Hugging Face cache first; when a
file is absent, one short probe of the hub decides; an unreachable hub is a BundleError naming the flag.

Used by import-original (--clip-pretrained, --tokenizer), training/extract_features.py
(--clip-pretrained) and training/train.py (--gpt2), so each fails offline with the same
`error: --flag: ...` line instead of a library's traceback after its retries.
"""
from __future__ import annotations

import os
from pathlib import Path

from clipcap.config import BundleError

HUB_PROBE_TIMEOUT_S = 5  # one metadata request without retries: an offline machine gets its error at once
CLIP_WEIGHTS_HINT = ("a local open_clip weights file (.safetensors/.bin; OpenAI's weights also need "
                     "--clip-model ViT-B-32-quickgelu or the matching -quickgelu name), or 'none' for random "
                     "CLIP weights (the bundle then captions nothing sensible: only for tests or for "
                     "caption-embeddings with precomputed CLIP embeddings)")
GPT2_HINT = "a local folder holding a GPT-2-family model (config.json, weights) and its tokenizer files"
GPT2_FILES = (["config.json"], ["model.safetensors", "pytorch_model.bin"], ["tokenizer.json"])


def hub_file(repo_id: str, filenames: list[str], flag: str, hint: str) -> str:
    """A hub file's local path: from the cache when there, else downloaded after one short probe.

    `filenames` are alternatives, the preferred first; `hint` says what to pass instead.
    """
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


def looks_like_path(name: str) -> bool:
    """A name that can only be a path (not a hub repo id 'owner/name')."""
    return name.endswith(".json") or name.startswith((".", "/", "~")) or name.count("/") > 1


def gpt2_folder(name: str, flag: str = "--gpt2") -> str:
    """A local folder for a GPT-2-family model: `name` itself when a folder, else the hub snapshot that
    holds its config, weights and tokenizer (each file from the cache first)."""
    if Path(name).is_dir():
        return name
    if looks_like_path(name) or Path(name).exists():
        raise BundleError(f"{flag}: {name}: no such folder; pass {flag} with {GPT2_HINT}")
    paths = [hub_file(name, filenames, flag, GPT2_HINT) for filenames in GPT2_FILES]
    return os.path.dirname(paths[0])  # one snapshot folder holds them all


def clip_weights_file(clip_model: str, pretrained: str, flag: str = "--clip-pretrained") -> tuple[str, bool]:
    """A local file of open_clip weights for a tag ('openai') or a path, and whether the tag needs QuickGELU."""
    import open_clip
    from open_clip.pretrained import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    if Path(pretrained).is_file():
        return pretrained, False  # the --clip-model name says it (the -quickgelu configs)
    source = open_clip.get_pretrained_cfg(clip_model, pretrained)
    if not source.get("hf_hub"):  # known tags all have one today; URL-only tags would wait on open_clip's download
        raise BundleError(f"{flag}: {pretrained!r} is neither a file nor an open_clip hub tag for "
                          f"{clip_model} (tags: {', '.join(open_clip.list_pretrained_tags_by_model(clip_model))}); "
                          f"pass {CLIP_WEIGHTS_HINT}")
    repo_id, filename = os.path.split(source["hf_hub"])  # open_clip's convention: a trailing '/' = default file
    filename = filename or HF_WEIGHTS_NAME
    names = [HF_SAFE_WEIGHTS_NAME, filename] if filename == HF_WEIGHTS_NAME else [filename]  # safetensors first
    return hub_file(repo_id, names, flag, CLIP_WEIGHTS_HINT), bool(source.get("quick_gelu"))

"""Peers in our latency benchmark: other CPU systems decoding the same weights, interleaved with ours.

Each round decodes the same prefixes for exactly `tokens` tokens with our onnxruntime bundle and
then with each peer, so load on a shared machine hits both alike; the report gives ms per token,
our speed-up over each peer, and whether the peer's greedy tokens are ours. A peer that cannot run
(not installed, incompatible, not implemented) is reported with the reason and the others go on.
`PEERS` declares each peer once; those that can never run here are off by default (`DEFAULT_PEERS`).
"""
from __future__ import annotations

import importlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clipcap.runtimes import set_compute_threads


def _hf_generate(gpt, prefix: torch.Tensor, tokens: int) -> list[list[int]]:
    with torch.inference_mode():
        out = gpt.generate(inputs_embeds=prefix, attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long),
                           max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, num_beams=1,
                           eos_token_id=None, pad_token_id=0)
    return out[:, -tokens:].tolist()


@dataclass(frozen=True)
class Peer:
    what: str  # the system, in words
    decode: Callable | None  # (gpt, prefix, tokens) -> greedy token ids; None: it cannot run, `not_implemented` says why
    requires: str | None = None  # the module it imports; a failing import is why it cannot run
    not_implemented: str = ""  # why `decode` is None


PEERS = {
    "hf-generate": Peer("transformers' GPT2LMHeadModel.generate(inputs_embeds=...) on the model bundle's GPT-2 "
                        "(the weights our export came from), greedy, KV cache on", _hf_generate),
    "optimum": Peer("optimum.onnxruntime.ORTModelForCausalLM (optional extra)", None, requires="optimum.onnxruntime",
                    not_implemented="optimum's ORTModelForCausalLM takes token ids, not prefix embeddings: "
                    "running it is not implemented"),
}
DEFAULT_PEERS = tuple(name for name, peer in PEERS.items() if peer.decode is not None)  # the ones that can run


@dataclass
class PeerConfig:
    model_bundle: Path  # the model bundle (safetensors weights): what the peers load
    export_bundle: Path  # ours: an export bundle decoded with the onnxruntime backend
    peers: list[str] = field(default_factory=lambda: list(DEFAULT_PEERS))  # which peers to run; others: asked for
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])  # prefixes decoded together
    tokens: int = 67  # tokens per caption, stop token ignored (the paper's entry_length)
    rounds: int = 3  # interleaved rounds per cell; the median is reported
    threads: int = 1  # torch and onnxruntime intra-op threads


def peer_unavailable(name: str) -> str | None:
    """Why peer `name` cannot run here, or None when it can."""
    if name not in PEERS:
        return f"unknown peer {name!r}; known: {', '.join(PEERS)}"
    peer = PEERS[name]
    if peer.requires:
        try:
            importlib.import_module(peer.requires)
        except Exception as error:  # an incompatible install raises more than ImportError
            return f"{peer.requires} not importable ({type(error).__name__}: {error})"
    return peer.not_implemented if peer.decode is None else None


def run_peers(config: PeerConfig) -> dict:
    """Interleaved rounds of ours vs each runnable peer; returns {"cells": [...], "unavailable": {...}}."""
    from clipcap.formats.model_bundle import load_bundle
    from clipcap.decoding import DecodingOptions, generate
    from clipcap.runtimes.onnx_runtime import OnnxRuntime

    set_compute_threads(config.threads)  # torch and the onnxruntime sessions opened after this
    unavailable = {name: reason for name in config.peers if (reason := peer_unavailable(name))}
    runnable = [name for name in config.peers if name not in unavailable]
    ours = OnnxRuntime.from_path(config.export_bundle, threads=config.threads)
    gpt = load_bundle(config.model_bundle).model.gpt.eval() if runnable else None
    options = DecodingOptions(max_tokens=config.tokens, ignore_stop=True)
    cells = []
    for batch in config.batch_sizes:
        prefix = torch.randn(batch, ours.config.mapper.prefix_length, ours.config.gpt2.n_embd,
                             generator=torch.Generator().manual_seed(batch))
        seconds = {name: [] for name in ["ours", *runnable]}
        tokens = {}
        for _ in range(config.rounds):
            start = time.perf_counter()
            tokens["ours"] = generate(ours, prefix, options, [], config.tokens)
            seconds["ours"].append(time.perf_counter() - start)
            for name in runnable:
                start = time.perf_counter()
                tokens[name] = PEERS[name].decode(gpt, prefix, config.tokens)
                seconds[name].append(time.perf_counter() - start)
        ms = {name: statistics.median(s) * 1e3 / config.tokens for name, s in seconds.items()}
        for name in runnable:
            cells.append({"peer": name, "batch_size": batch, "tokens": config.tokens, "ours_ms_per_token": ms["ours"],
                          "peer_ms_per_token": ms[name], "speedup": ms[name] / ms["ours"],
                          "same_greedy_tokens": tokens[name] == tokens["ours"]})
    return {"cells": cells, "unavailable": unavailable}


def peers_markdown(report: dict) -> str:
    lines = ["| peer | batch | ours ms/token | peer ms/token | ours faster by | same greedy tokens |",
             "|---|---:|---:|---:|---:|---|"]
    lines += [f"| {c['peer']} | {c['batch_size']} | {c['ours_ms_per_token']:.1f} | {c['peer_ms_per_token']:.1f} | "
              f"{c['speedup']:.2f}x | {'yes' if c['same_greedy_tokens'] else 'no'} |" for c in report["cells"]]
    lines += [f"\n{name}: {PEERS[name].what}" for name in dict.fromkeys(c["peer"] for c in report["cells"])]
    lines += [f"\n{name}: not run: {reason}" for name, reason in report["unavailable"].items()]
    return "\n".join(lines) + "\n"

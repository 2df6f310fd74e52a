"""Peers in the benchmark: a peer that cannot run is off by default and, asked for, says why; the others run
and match our greedy tokens."""
import sys
from types import ModuleType

from clipcap_bench.peers import DEFAULT_PEERS, PEERS, PeerConfig, peer_unavailable, peers_markdown, run_peers


def test_peers_that_cannot_run_are_off_by_default(tiny_bundle, tiny_export, monkeypatch):
    assert "optimum" in PEERS and "optimum" not in DEFAULT_PEERS
    assert PeerConfig(tiny_bundle, tiny_export).peers == ["hf-generate"]
    monkeypatch.setitem(sys.modules, "optimum.onnxruntime", ModuleType("optimum.onnxruntime"))  # as if installed
    assert peer_unavailable("optimum") == PEERS["optimum"].not_implemented
    assert "takes token ids, not prefix embeddings" in peer_unavailable("optimum")
    assert peer_unavailable("hf-generate") is None


def test_missing_peer_is_reported_and_the_rest_runs(tiny_bundle, tiny_export, monkeypatch):
    monkeypatch.setitem(sys.modules, "optimum.onnxruntime", None)  # import fails as when not installed
    assert "not importable" in peer_unavailable("optimum")
    config = PeerConfig(tiny_bundle, tiny_export, peers=["hf-generate", "optimum", "llama.cpp"], batch_sizes=[1, 3],
                        tokens=6, rounds=1)
    report = run_peers(config)
    assert set(report["unavailable"]) == {"optimum", "llama.cpp"}
    assert "unknown peer 'llama.cpp'" in report["unavailable"]["llama.cpp"]
    assert [c["batch_size"] for c in report["cells"]] == [1, 3]
    assert all(c["peer"] == "hf-generate" and c["same_greedy_tokens"] for c in report["cells"])
    markdown = peers_markdown(report)
    assert "optimum: not run" in markdown and f"hf-generate: {PEERS['hf-generate'].what}" in markdown

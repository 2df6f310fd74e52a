"""Roofline arithmetic: GPT-2's parameter count and a decoder step's FLOPs and bytes."""
import pytest
from hypothesis import given, strategies as st

from clipcap_bench.roofline import decode_step_cost, gpt2_parameter_count
from clipcap.config import GPT2Config


def test_gpt2_parameter_count_matches_transformers():
    from transformers import GPT2Config as HFConfig, GPT2LMHeadModel

    tiny = GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(HFConfig(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=2))
    wpe = model.transformer.wpe.weight.numel()  # a step reads one row of it: not counted
    assert sum(gpt2_parameter_count(tiny).values()) == sum(p.numel() for p in model.parameters()) - wpe
    assert sum(gpt2_parameter_count(GPT2Config()).values()) + 1024 * 768 == 124_439_808  # GPT-2 small


def test_decode_step_cost_scales_as_the_arithmetic_says():
    gpt2 = GPT2Config()
    one = decode_step_cost(gpt2, batch=1, past=38, new=1, weight_bytes=4e8)
    eight = decode_step_cost(gpt2, batch=8, past=38, new=1, weight_bytes=4e8)
    assert eight.flops == pytest.approx(8 * one.flops) and eight.weight_bytes == one.weight_bytes
    assert one.kv_bytes == 2 * 12 * 1 * 39 * 768 * 4
    # A token step at batch 1 is far below one FLOP per byte: memory-bound.
    assert one.flops / one.bytes < 1



def test_vit_image_cost_counts_open_clips_parameters():
    from clipcap_bench.roofline import vit_image_cost
    from clipcap.model import build_clip_visual, resolve_clip_config

    clip = resolve_clip_config("ViT-B-32")
    cost = vit_image_cost(clip)
    assert cost.weight_bytes == 4 * sum(p.numel() for p in build_clip_visual(clip).parameters())
    assert cost.flops == pytest.approx(8.82e9, rel=1e-3)  # the figure derived by hand for the request work
    resnet = resolve_clip_config("RN50")  # layers is a list: not a ViT, no cost claimed
    assert vit_image_cost(resnet) is None


def test_peaks_take_the_fastest_library_and_traffic():
    from clipcap_bench.roofline import measure_peaks

    peaks = measure_peaks(matmul_sizes=(64, 128), read_mb=4, repeats=2)
    rates = peaks["matmul_gflops_by_library"]
    assert set(rates) == {"torch", "onnxruntime-mlas"} and all(set(r) == {64, 128} for r in rates.values())
    assert peaks["matmul_gflops"] == max(v for r in rates.values() for v in r.values())
    assert peaks["matmul_gflops"] == rates[peaks["matmul_library"]][peaks["matmul_size"]]
    assert peaks["bandwidth_gbps"] == max(peaks["read_gbps"], peaks["copy_gbps"]) > 0


@given(st.sets(st.sampled_from(["avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "fma", "sse4_2"])))
def test_isa_names_follow_the_cpu_flags(flags):
    from clipcap_bench.machine import ISA_FLAGS, cpu_isa, fingerprint

    isa = cpu_isa(flags)
    assert isa == [name for name in ISA_FLAGS if any(flag in flags for flag in ISA_FLAGS[name])]
    assert ("VNNI" in isa) == bool(flags & {"avx512_vnni", "avx_vnni"})
    machine = {"cpu": "AMD EPYC", "logical_cores": 2, "memory_gb": 8.0, "gpu": None}
    # Same model name, other vector units: another fingerprint, so their figures are never pooled.
    assert (fingerprint({**machine, "isa": isa}) == fingerprint({**machine, "isa": cpu_isa(flags | {"amx_tile"})})) \
        == ("AMX" in isa)

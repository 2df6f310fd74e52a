"""Roofline arithmetic: GPT-2's parameter count and a decoder step's FLOPs and bytes."""
import pytest

from clipcap.bench.roofline import decode_step_cost, gpt2_parameter_count
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


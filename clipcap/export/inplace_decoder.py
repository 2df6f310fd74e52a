"""The GPT-2 step graph for onnxruntime: KV cache updated in place, linears as MatMul, fused by onnxruntime.

`InPlaceDecoderStep` runs GPT-2's own layer norms, MLP activation and weights; only attention is
onnxruntime's `GroupQueryAttention` (num_heads == kv_num_heads: plain multi-head attention). Its
past and present caches are (B, H, capacity, D) buffers: the runtime binds the same memory as past
input and present output, and the op writes the new keys/values at their positions, so a step
neither concatenates nor copies the cache. Linears are written `x @ W + b` (MatMul + Add, not Gemm)
so onnxruntime's weight-only quantiser (MatMulNBits) applies. After export, onnxruntime's own
transformer optimiser fuses SkipLayerNormalization and FastGelu (bias folded in).

A torch custom op stands for the attention: its eager body is the PyTorch reference the parity
check runs; the exporter translates it into the contrib op.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn


@torch.library.custom_op("clipcap::kv_attention", mutates_args=())
def kv_attention(qkv: Tensor, past_key: Tensor, past_value: Tensor, seqlens_k: Tensor, total_length: Tensor,
                 num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Causal attention of S new positions after `total - S` cached ones; returns (out, keys, values).

    qkv (B, S, 3E) packed as GPT-2's c_attn writes it; caches (B, H, capacity, D). Every row has the
    same length (rows are never padded), so `seqlens_k` (total - 1 per row, for onnxruntime) is unused here.
    """
    batch, length, width = qkv.shape
    embed = width // 3
    head_dim = embed // num_heads
    total = int(total_length)
    past = total - length
    query, key, value = (t.reshape(batch, length, num_heads, head_dim).transpose(1, 2) for t in qkv.split(embed, -1))
    keys, values = past_key.clone(), past_value.clone()
    keys[:, :, past:total], values[:, :, past:total] = key, value
    causal = torch.ones(length, total, dtype=torch.bool, device=qkv.device).tril(past)
    out = nn.functional.scaled_dot_product_attention(query, keys[:, :, :total], values[:, :, :total], attn_mask=causal)
    return out.transpose(1, 2).reshape(batch, length, embed), keys, values


@kv_attention.register_fake
def _(qkv, past_key, past_value, seqlens_k, total_length, num_heads):
    batch, length, width = qkv.shape
    return qkv.new_empty(batch, length, width // 3), torch.empty_like(past_key), torch.empty_like(past_value)


def _group_query_attention_schema():
    """The contrib op's signature as far as we use it (the onnx package knows no com.microsoft schemas)."""
    from onnx.defs import OpSchema

    optional = OpSchema.FormalParameterOption.Optional
    parameter = OpSchema.FormalParameter
    inputs = [parameter("query", "T"), parameter("key", "T", param_option=optional),
              parameter("value", "T", param_option=optional), parameter("past_key", "T", param_option=optional),
              parameter("past_value", "T", param_option=optional), parameter("seqlens_k", "M"),
              parameter("total_sequence_length", "M")]
    outputs = [parameter("output", "T"), parameter("present_key", "T"), parameter("present_value", "T")]
    return OpSchema("GroupQueryAttention", "com.microsoft", 1, inputs=inputs, outputs=outputs,
                    type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
                    attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, ""),
                                OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, "")])


def _kv_attention_onnx(qkv, past_key, past_value, seqlens_k, total_length, num_heads: int):
    from onnxscript.values import Op, Opset

    attention = Op(Opset("com.microsoft", 1), "GroupQueryAttention", _group_query_attention_schema())
    return attention(qkv, None, None, past_key, past_value, seqlens_k, total_length,
                     num_heads=num_heads, kv_num_heads=num_heads, _num_outputs=3)


def _linear(x: Tensor, conv1d) -> Tensor:
    return x @ conv1d.weight + conv1d.bias  # transformers' Conv1D keeps weight as (in, out): MatMul + Add


class InPlaceDecoderStep(nn.Module):
    """One GPT-2 step: (inputs_embeds, position_ids, *caches) -> (last-position logits, *caches)."""

    # The attention custom op -> onnxruntime's contrib op, for clipcap.export.onnx.export_graph.
    translations = {torch.ops.clipcap.kv_attention.default: _kv_attention_onnx}

    def __init__(self, model):
        super().__init__()
        self.gpt = model.gpt

    def forward(self, inputs_embeds, position_ids, *caches):
        transformer, heads = self.gpt.transformer, self.gpt.config.n_head
        seqlens_k = position_ids[:, -1].to(torch.int32)  # (B,) index of each row's last position
        total = (position_ids[:, -1].max() + 1).to(torch.int32)  # () positions attended after this step
        hidden = inputs_embeds + transformer.wpe(position_ids)  # (B, S, E)
        presents = []
        for layer, block in enumerate(transformer.h):
            qkv = _linear(block.ln_1(hidden), block.attn.c_attn)  # (B, S, 3E)
            attended, keys, values = torch.ops.clipcap.kv_attention(
                qkv, caches[2 * layer], caches[2 * layer + 1], seqlens_k, total, heads)
            presents += [keys, values]
            hidden = hidden + _linear(attended, block.attn.c_proj)
            hidden = hidden + _linear(block.mlp.act(_linear(block.ln_2(hidden), block.mlp.c_fc)), block.mlp.c_proj)
        logits = transformer.ln_f(hidden[:, -1]) @ self.gpt.lm_head.weight.t()  # (B, V)
        return (logits, *presents)

    def optimize(self, path: Path, external_data: bool) -> dict:
        """onnxruntime's GPT-2 optimiser over the exported file, in place; returns its fusion counts."""
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model

        config = self.gpt.config
        # opt_level 0: only the Python fusions, so the file stays portable across CPUs; the session
        # applies its own level-2 rewrites when it loads the graph.
        optimized = optimize_model(str(path), model_type="gpt2", num_heads=config.n_head, hidden_size=config.n_embd,
                                   opt_level=0, optimization_options=FusionOptions("gpt2"))
        optimized.save_model_to_file(str(path), use_external_data_format=external_data)
        return {op: count for op, count in optimized.get_fused_operator_statistics().items() if count}

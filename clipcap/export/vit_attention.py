"""The CLIP ViT's self-attention as onnxruntime's fused `com.microsoft.Attention`, for the encoder graph.

open_clip's blocks call `nn.MultiheadAttention`, which exports as a packed-QKV graph none of
onnxruntime's attention fusions recognise. `fusable_visual` returns a copy of the tower whose
attention modules take the same weights but call one torch custom op: its eager body (one QKV matmul,
scaled dot-product attention) is the PyTorch reference the parity check runs, and the exporter
translates it into the contrib op, which takes the input, the (E, 3E) QKV weights and their bias and
prepacks the weights once per session. The output projection stays a plain linear. After export,
onnxruntime's ViT optimiser fuses SkipLayerNormalization and BiasGelu around it.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


@torch.library.custom_op("clipcap::vit_self_attention", mutates_args=())
def vit_self_attention(x: Tensor, qkv_weight: Tensor, qkv_bias: Tensor, num_heads: int) -> Tensor:
    """Unmasked self-attention of (B, S, E) `x`; `qkv_weight` (E, 3E) as onnxruntime's Attention takes it."""
    batch, length, width = x.shape
    query, key, value = (t.reshape(batch, length, num_heads, width // num_heads).transpose(1, 2)
                         for t in (x @ qkv_weight + qkv_bias).split(width, dim=-1))  # (B, H, S, D) each
    attended = nn.functional.scaled_dot_product_attention(query, key, value)
    return attended.transpose(1, 2).reshape(batch, length, width)


@vit_self_attention.register_fake
def _(x, qkv_weight, qkv_bias, num_heads):
    return torch.empty_like(x)


def _attention_schema():
    """The contrib op's signature as far as we use it (the onnx package knows no com.microsoft schemas)."""
    from onnx.defs import OpSchema

    parameter = OpSchema.FormalParameter
    return OpSchema("Attention", "com.microsoft", 1,
                    inputs=[parameter("input", "T"), parameter("weights", "T"), parameter("bias", "T")],
                    outputs=[parameter("output", "T")],
                    type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "")],
                    attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "")])


def _vit_self_attention_onnx(x, qkv_weight, qkv_bias, num_heads: int):
    from onnxscript.values import Op, Opset

    return Op(Opset("com.microsoft", 1), "Attention", _attention_schema())(x, qkv_weight, qkv_bias, num_heads=num_heads)


TRANSLATIONS = {torch.ops.clipcap.vit_self_attention.default: _vit_self_attention_onnx}  # for torch.onnx.export


class FusedSelfAttention(nn.Module):
    """Stands in for a block's `nn.MultiheadAttention` (same call, same weights): (x, x, x) -> (out, None)."""

    def __init__(self, attention: nn.MultiheadAttention):
        super().__init__()
        self.num_heads = attention.num_heads
        self.register_buffer("qkv_weight", attention.in_proj_weight.detach().t().contiguous())  # (E, 3E)
        self.register_buffer("qkv_bias", attention.in_proj_bias.detach().clone())
        self.out_proj = attention.out_proj

    def forward(self, query, key, value, need_weights=False, attn_mask=None):
        if attn_mask is not None or query is not key or key is not value:
            raise ValueError("FusedSelfAttention takes unmasked self-attention only (the CLIP ViT's)")
        return self.out_proj(torch.ops.clipcap.vit_self_attention(query, self.qkv_weight, self.qkv_bias,
                                                                   self.num_heads)), None


def fusable_visual(visual: nn.Module) -> tuple[nn.Module, int]:
    """A copy of an open_clip tower with each batch-first, biased `nn.MultiheadAttention` of its
    transformer replaced; returns it and how many were (0: nothing to fuse, e.g. a ResNet tower)."""
    from open_clip.transformer import ResidualAttentionBlock

    fused = copy.deepcopy(visual).eval()
    replaced = 0
    for block in fused.modules():
        attention = getattr(block, "attn", None)
        if isinstance(block, ResidualAttentionBlock) and isinstance(attention, nn.MultiheadAttention) \
                and attention.batch_first and attention.in_proj_bias is not None and attention._qkv_same_embed_dim:
            block.attn = FusedSelfAttention(attention)
            replaced += 1
    return fused, replaced


def optimize_vit(path, width: int, heads: int, external_data: bool) -> dict:
    """onnxruntime's ViT optimiser over an exported encoder (opt_level 0: the Python fusions only, so the
    file stays portable across CPUs); returns its fusion counts."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(str(path), model_type="vit", num_heads=heads, hidden_size=width, opt_level=0,
                               optimization_options=FusionOptions("vit"))
    optimized.save_model_to_file(str(path), use_external_data_format=external_data)
    return {op: count for op, count in optimized.get_fused_operator_statistics().items() if count}

"""Causal attention through torch.nn.functional.scaled_dot_product_attention, which picks a
fused kernel (flash, memory-efficient, cuDNN) for the device."""

import torch.nn.functional as F

from lab.attention import SelfAttention, additive_mask, causal_mask
from lab.slots import ComponentConfig


class SDPAConfig(ComponentConfig):
    pass


class SDPAAttention(SelfAttention):
    grouped_kv = True  # SDPA's enable_gqa takes k and v with their n_kv_head heads, no copies

    def __init__(self, config: SDPAConfig, model):
        super().__init__(model)

    def attend(self, q, k, v, q_pos, k_pos, bias):
        dropout = self.dropout if self.training else 0.0
        gqa = k.size(1) != q.size(1)
        if bias is None and q.size(2) == k.size(2):  # whole sequence from position 0: plain causal
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, enable_gqa=gqa)
        if bias is None and q.size(2) == 1:  # one new token sees every cached one
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, enable_gqa=gqa)
        mask = additive_mask(causal_mask(q_pos, k_pos), bias, q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=gqa)

"""Self-attention whose output projection is called as a module, so its input can be quantized.

``nn.MultiheadAttention`` hands ``out_proj.weight`` to ``F.multi_head_attention_forward``
directly: the ``out_proj`` module never runs, so the activation quantizer that ``quantize_``
attaches to it as a forward pre-hook never sees the attention output (its weight, read through
the parametrization, is quantized either way). ``QuantizableMHA`` computes the common case --
self-attention without weights returned, an additive or no mask -- with
``F.scaled_dot_product_attention`` and then *calls* ``out_proj``; anything else goes to the
parent's forward. Same parameters and state_dict keys, so pretrained checkpoints load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class QuantizableMHA(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with ``out_proj`` called as a module on the fast path."""

    def _fast_path_ok(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        need_weights: bool,
        attn_mask: torch.Tensor | None,
    ) -> bool:
        float_mask = attn_mask is None or attn_mask.is_floating_point()
        return (
            query is key
            and key is value
            and query.dim() == 3
            and self._qkv_same_embed_dim
            and key_padding_mask is None
            and not need_weights
            and float_mask
            and self.bias_k is None
            and self.bias_v is None
            and not self.add_zero_attn
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self._fast_path_ok(query, key, value, key_padding_mask, need_weights, attn_mask):
            return super().forward(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        x = query if self.batch_first else query.transpose(0, 1)  # [N, L, E]
        n, length, embed = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = (t.reshape(n, length, self.num_heads, self.head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal and attn_mask is None,
        )
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, embed))  # the module: hooks run
        return (out if self.batch_first else out.transpose(0, 1)), None

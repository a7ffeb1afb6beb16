"""A test double of the MoE++ authors' released model, written here from the spec
(moepp-semantics.md): the same call contract and module attribute layout, the
same math, computed the way the released layer does (a Python loop over the
experts, index_select / index_add). Their code is not copied.

- `MoEBlock` is each decoder layer's `mlp`: forward(hidden_states, used_token=None,
  gate_residual=None) -> (out, logits), with the gating flags as attributes and
  submodules `moe.gate` (`wg`, `gate_map`) and `moe.experts.experts`.
- `DecoderLayer` calls `self.mlp(hidden_states, gate_residual=gate_residual)` and
  unpacks `(hidden_states, gate_residual)`, as the released decoder does.
- Top-k is this module's `MOE_TOP_K`, as in the released layer file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MOE_TOP_K = 2
N_CONSTANT = 2


class ExpertFFN(nn.Module):
    def __init__(self, d: int, i: int):
        super().__init__()
        self.up_proj = nn.Linear(d, 2 * i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)

    def forward(self, x):
        gate, up = self.up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class ConstantExpert(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.constant = nn.Parameter(torch.randn(d))
        self.wg = nn.Linear(d, 2, bias=False)

    def forward(self, x):
        a = F.softmax(self.wg(x), dim=-1)
        return a[:, :1] * x + a[:, 1:] * self.constant.to(x.dtype)


class CopyExpert(nn.Module):
    def forward(self, x):
        return x


class ZeroExpert(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


class Gate(nn.Module):
    def __init__(self, d: int, n: int, two_layer: bool, mixtral: bool, logits_norm: bool, norm_std: float):
        super().__init__()
        self.wg = (nn.Sequential(nn.Linear(d, 8 * n, bias=False), nn.Tanh(), nn.Linear(8 * n, n, bias=False))
                   if two_layer else nn.Linear(d, n, bias=False))
        self.gate_map = nn.Linear(n, n, bias=False)
        self.moe_use_mixtral_gating = mixtral
        self.moe_use_logits_norm = logits_norm
        self.moe_gate_norm_std = norm_std

    def forward(self, x, gate_residual=None):
        """Per-expert (token ids, gates) and the fp32 logits to pass on (spec: "Router")."""
        wg = self.wg.float()
        logits = wg(x.float())
        if gate_residual is not None:
            logits = logits + self.gate_map(gate_residual.to(self.gate_map.weight.dtype)).float()
        n = logits.shape[1]
        z = logits / (logits.std(dim=1, keepdim=True) / self.moe_gate_norm_std) if self.moe_use_logits_norm else logits
        if self.moe_use_mixtral_gating:
            gates, ids = torch.topk(z, MOE_TOP_K, dim=1)
            gates = F.softmax(gates, dim=1)
        else:
            gates, ids = torch.topk(F.softmax(z, dim=1), MOE_TOP_K, dim=1)
            gates = torch.where(ids == n - 1, torch.zeros_like(gates), gates)  # the zero expert is the last
            gates = gates / gates.sum(dim=1, keepdim=True)
        routes = {}
        for e in range(n):
            token, slot = torch.nonzero(ids == e, as_tuple=True)
            routes[e] = (token, gates[token, slot])
        return routes, logits


class Experts(nn.Module):
    def __init__(self, d: int, i: int, n: int):
        super().__init__()
        self.experts = nn.ModuleList([ExpertFFN(d, i) for _ in range(n - 2 - N_CONSTANT)]
                                     + [ConstantExpert(d) for _ in range(N_CONSTANT)] + [CopyExpert(), ZeroExpert()])


class MoELayer(nn.Module):
    def __init__(self, gate: Gate, experts: Experts, mixtral: bool, no_mul_topk: bool):
        super().__init__()
        self.gate = gate
        self.experts = experts
        self.moe_use_mixtral_gating = mixtral
        self.moe_feature_no_mul_topk = no_mul_topk

    def forward(self, *inputs, gate_residual=None):
        x = inputs[0].reshape(-1, inputs[0].shape[-1])
        out = torch.zeros_like(x)
        routes, logits = self.gate(x, gate_residual)
        if not (self.moe_use_mixtral_gating or self.moe_feature_no_mul_topk):
            x = x * MOE_TOP_K
        for e, (token, gates) in routes.items():
            y = self.experts.experts[e](x.index_select(0, token))
            out.index_add_(0, token, y * gates.unsqueeze(-1).to(y.dtype))
        return out.reshape(inputs[0].shape), logits


class MoEBlock(nn.Module):
    """The released layer module (`mlp`)."""

    def __init__(self, d: int, i: int, n: int, mixtral: bool = False, two_layer: bool = True,
                 logits_norm: bool = False, norm_std: float = 1.0, no_mul_topk: bool = False):
        super().__init__()
        self.num_experts = n
        self.moe_use_mixtral_gating = mixtral
        self.moe_2layer_gate = two_layer
        self.moe_use_logits_norm = logits_norm
        self.moe_gate_norm_std = norm_std
        self.moe_feature_no_mul_topk = no_mul_topk
        self.moe = MoELayer(Gate(d, n, two_layer, mixtral, logits_norm, norm_std), Experts(d, i, n), mixtral,
                            no_mul_topk)

    def forward(self, hidden_states, used_token=None, gate_residual=None):
        return self.moe(hidden_states, used_token, gate_residual=gate_residual)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class DecoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, mlp: MoEBlock):
        super().__init__()
        self.input_layernorm = RMSNorm(d)
        self.self_attn = Attention(d, heads)
        self.post_attention_layernorm = RMSNorm(d)
        self.mlp = mlp

    def forward(self, hidden_states, gate_residual=None):
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states))
        residual = hidden_states
        hidden_states, gate_residual = self.mlp(self.post_attention_layernorm(hidden_states),
                                                gate_residual=gate_residual)
        return residual + hidden_states, gate_residual


class MoeForCausalLM(nn.Module):
    """embed -> decoder layers (the routing-score residual chained through them) -> norm -> lm_head."""

    def __init__(self, vocab: int = 64, d: int = 32, i: int = 24, n: int = 8, layers: int = 2, heads: int = 2,
                 **block_flags):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([DecoderLayer(d, heads, MoEBlock(d, i, n, **block_flags)) for _ in range(layers)])
        self.norm = RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids):
        h = self.embed_tokens(input_ids)
        gate_residual = None
        for layer in self.layers:
            h, gate_residual = layer(h, gate_residual=gate_residual)
        return self.lm_head(self.norm(h))

    @torch.no_grad()
    def greedy(self, input_ids, new_tokens: int):
        for _ in range(new_tokens):
            input_ids = torch.cat([input_ids, self(input_ids)[:, -1:].argmax(-1)], dim=1)
        return input_ids

"""torch.library.opcheck over every moepp:: op on small CPU inputs: the schema
(mutation and aliasing), the fake implementation against the real one and the
autograd registration; AOTAutograd with dynamic shapes too, for the ops whose
outputs opcheck can compare. It cannot for
- the ops that leave buffer rows past the plan's row count unwritten (build_plan's
  row_src, the FFN outputs y): their contents are whatever the allocator gave, so
  eager and traced runs differ there by design (no memset on the hot path);
- router_forward, whose first output is integer: opcheck's helper sums all outputs
  into one tensor that then has an integer dtype and rejects the float ones.
Their traced forward and backward are checked by test_compile.py (fullgraph)."""

import pytest
import torch

import moepp_kernels  # noqa: F401  (registers the ops)
from moepp_kernels import MoEPPConfig, build_plan
from moepp_kernels._ops.combine import layout_scalars
from moepp_kernels._ops.router import router_scalars

CFG = MoEPPConfig(hidden_size=16, ffn_size=8, n_ffn=5, n_constant=2, n_copy=1, n_zero=1, top_k=3,
                  normalize_logits=True, scale_input_by_topk=True)
TOKENS = 7


def tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    n, d, i, c = CFG.n_experts, CFG.hidden_size, CFG.ffn_size, CFG.n_constant
    logits = torch.randn(TOKENS, n, generator=g)
    ids = torch.stack([torch.randperm(n, generator=g)[: CFG.top_k] for _ in range(TOKENS)]).to(torch.int32)
    plan = build_plan(ids, CFG.n_ffn)
    return {
        "logits": logits, "prev": torch.randn(TOKENS, n, generator=g), "G": torch.randn(n, n, generator=g) / n,
        "bias": 0.1 * torch.randn(n, generator=g), "ids": ids, "weights": torch.rand(TOKENS, CFG.top_k, generator=g),
        "plan": plan, "x": torch.randn(TOKENS, d, generator=g), "up": torch.randn(CFG.n_ffn, 2 * i, d, generator=g),
        "down": torch.randn(CFG.n_ffn, d, i, generator=g), "y": torch.randn(TOKENS * CFG.top_k, d, generator=g),
        "mix": torch.randn(TOKENS, 2 * c, generator=g), "value": torch.randn(c, d, generator=g),
        "h": torch.randn(TOKENS * CFG.top_k, 2 * i, generator=g),
    }


def grad(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


FFN_SCALARS = (CFG.top_k, float(CFG.top_k), "torch")  # top_k, scale, backend


def cases():
    t = tensors()
    p = t["plan"]
    rs = tuple(router_scalars(CFG))
    layout = layout_scalars(CFG)
    logits, prev, G = grad(t["logits"], t["prev"], t["G"])
    x, up, down = grad(t["x"], t["up"], t["down"])
    cx, cy, cw, cm, cv = grad(t["x"], t["y"], t["weights"], t["mix"], t["value"])
    routed = torch.randn_like(t["logits"])
    gate_w = torch.randn(CFG.n_experts, CFG.hidden_size)
    long_x = torch.randn(600, CFG.hidden_size).bfloat16()  # the CPU's 512-row chunks and a tail
    return {
        "gate_linear": (torch.ops.moepp.gate_linear, tuple(grad(t["x"], gate_w))),
        "gate_linear (bf16, chunked)": (torch.ops.moepp.gate_linear, tuple(grad(long_x, gate_w))),
        "gate_linear_backward": (torch.ops.moepp.gate_linear_backward,
                                 (torch.randn(600, CFG.n_experts), long_x, gate_w)),
        "residual_logits": (torch.ops.moepp.residual_logits, tuple(grad(t["logits"], t["prev"], t["G"]))),
        "residual_logits_backward": (torch.ops.moepp.residual_logits_backward,
                                     (torch.randn_like(t["logits"]), t["prev"], t["G"])),
        "router_forward (residual, stats)": (torch.ops.moepp.router_forward,
                                             (logits, prev, G, t["bias"], *rs, True)),
        "router_forward (first layer)": (torch.ops.moepp.router_forward,
                                         (grad(t["logits"])[0], None, None, None, *rs, False)),
        "router_backward": (torch.ops.moepp.router_backward,
                            (torch.randn(TOKENS, CFG.top_k), torch.randn_like(routed), torch.randn(CFG.n_experts),
                             routed, t["ids"], t["G"], *rs)),
        "build_plan": (torch.ops.moepp.build_plan, (t["ids"], CFG.n_ffn)),
        "expert_ffn": (torch.ops.moepp.expert_ffn, (x, up, down, p.row_src, p.slot_row, p.offsets, *FFN_SCALARS)),
        "expert_ffn_inference": (torch.ops.moepp.expert_ffn_inference,
                                 (t["x"], t["up"], t["down"], p.row_src, p.offsets, *FFN_SCALARS)),
        "expert_ffn_backward": (torch.ops.moepp.expert_ffn_backward,
                                (t["y"], t["x"], t["up"], t["down"], t["h"], p.row_src, p.slot_row, p.offsets,
                                 *FFN_SCALARS)),
        "combine": (torch.ops.moepp.combine, (cx, cy, t["ids"], cw, p.slot_row, cm, cv, *layout)),
        "combine_backward": (torch.ops.moepp.combine_backward,
                             (torch.randn_like(t["x"]), t["x"], t["y"], t["ids"], t["weights"], p.slot_row, t["mix"],
                              t["value"], *layout)),
    }


CASES = cases()


WITHOUT_AOT_CHECK = {"router_forward", "build_plan", "expert_ffn", "expert_ffn_inference"}
BASIC = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("name", list(CASES))
def test_opcheck(name):
    op, args = CASES[name]
    utils = BASIC if name.split(" ")[0] in WITHOUT_AOT_CHECK else BASIC + ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(op.default, args, test_utils=utils)


def test_every_moepp_op_is_checked():
    registered = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("moepp::")}
    checked = {name.split(" ")[0] for name in CASES}
    assert registered == checked, f"ops without an opcheck case: {registered - checked}"

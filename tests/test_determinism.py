"""The CPU layer is bitwise reproducible run to run, and the same layer called from
several Python threads at once (the ops release the GIL) gives the results of serial
calls."""

from concurrent.futures import ThreadPoolExecutor

import torch

from moepp_kernels import MoEPPConfig, MoEPPLayer

CFG = MoEPPConfig.moepp_0_6b().with_(hidden_size=64, ffn_size=48, normalize_logits=True)


def make_layer():
    torch.manual_seed(0)
    layer = MoEPPLayer(CFG, has_residual=True, dtype=torch.float32)
    with torch.no_grad():
        layer.router.residual_weight.normal_(std=0.2)
    return layer


def batch(seed, tokens=300):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, CFG.hidden_size, generator=g), torch.randn(tokens, CFG.n_experts, generator=g)


def step(layer, seed):
    """Forward and backward of one batch: (out, logits, gradients of every input)."""
    x, prev = batch(seed)
    x.requires_grad_()
    prev.requires_grad_()
    out, logits, balance = layer(x, prev, return_balance_loss=True)
    leaves = [x, prev, *layer.parameters()]
    grads = torch.autograd.grad(out.square().sum() + logits.sum() + balance, leaves)
    return [out.detach(), logits.detach(), *grads]


def assert_bitwise_equal(a, b):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert torch.equal(u, v), f"result {i} differs"


def test_forward_and_backward_are_bitwise_reproducible():
    layer = make_layer()
    assert_bitwise_equal(step(layer, 1), step(layer, 1))
    assert_bitwise_equal(step(make_layer(), 1), step(layer, 1))


def test_threads_give_the_results_of_serial_calls():
    layer = make_layer()
    seeds = list(range(8))
    serial = [step(layer, s) for s in seeds]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(lambda s: step(layer, s), seeds))
    for a, b in zip(serial, threaded):
        assert_bitwise_equal(a, b)
    with torch.no_grad(), ThreadPoolExecutor(max_workers=4) as pool:
        inference = list(pool.map(lambda s: layer(*batch(s))[0], seeds))
    for a, b in zip(serial, inference):
        assert torch.equal(a[0], b)

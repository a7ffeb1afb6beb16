"""Expert parallelism on real torch.distributed process groups: gloo on the CPU, W =
2 and 4 ranks as processes (tests/distributed_cases.py), each case against the
single-device layer; NCCL with 2 GPUs when there are. Every collective runs under
the group's 60 s timeout and the whole run under a deadline, so a hang fails
instead of stalling CI."""

import multiprocessing as mp
import queue
import socket

import distributed_cases
import pytest
import torch
import torch.distributed as dist

from moepp_kernels.distributed import expert_ranges

DEADLINE_S = 240

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, names: list[str], backend: str = "gloo") -> None:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=distributed_cases.run_rank, args=(r, world, port, names, results, backend))
             for r in range(world)]
    for p in procs:
        p.start()
    errors = {}
    try:
        for _ in range(world):
            rank, error = results.get(timeout=DEADLINE_S)
            if error:
                errors[rank] = error
    except queue.Empty:
        errors["deadline"] = f"not every rank reported within {DEADLINE_S} s (a hang)"
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert not errors, "\n".join(f"rank {r}:\n{e}" for r, e in errors.items())


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_layer_matches_single_device(world):
    run_ranks(world, list(distributed_cases.CASES))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2 or not dist.is_nccl_available(),
                    reason="needs 2 GPUs and NCCL")
def test_expert_parallel_layer_on_nccl():
    run_ranks(2, list(distributed_cases.CASES), backend="nccl")


def test_expert_ranges():
    assert expert_ranges(6, 4) == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert expert_ranges(8, 2) == [(0, 4), (4, 8)]
    assert expert_ranges(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    with pytest.raises(ValueError, match="world"):
        expert_ranges(4, 0)


def test_needs_an_initialised_group():
    from moepp_kernels import MoEPPConfig
    from moepp_kernels.distributed import ExpertParallelMoEPPLayer

    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        ExpertParallelMoEPPLayer(MoEPPConfig(hidden_size=8, ffn_size=4, n_ffn=2, n_zero=1))

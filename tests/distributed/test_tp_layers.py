"""Tests for tensor parallelism: the parallel layers and the process group on 2 and 3 gloo ranks (CPU, 1 thread each).

Each rank builds the unsplit layer from the same seed, takes its share
through `checkpoint_slice` (as the loader does), and returns both outputs;
rank 0's unsplit output is the reference. Column-parallel projections and
the vocab-parallel embedding must be bit-exact (each output element is the
same dot product, and the embedding's all-reduce adds only zeros);
row-parallel ones sum partial dot products in another order, so they agree
within ROW_ATOL (~1 ulp of values of order 1 per reduction) and bitwise
across ranks (every rank receives the same sum).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from rank_runner import run_ranks
from torch import nn

from pagoda.distributed.parallel_state import SINGLE_RANK, TensorParallelGroup, init_tensor_parallel
from pagoda.models.interfaces import AttentionLayerSpec
from pagoda.models.layers import Linear, MergedLinear
from pagoda.models.parallel_linear import (
    gate_up_projection,
    local_attention_spec,
    qkv_projection,
    row_projection,
    vocab_embedding,
)

ROW_ATOL = 1e-5
HIDDEN, HEAD_DIM, TOKENS, INTERMEDIATE, VOCAB = 64, 16, 7, 96, 97  # 97: the last rank's vocab slice is padded
# (query heads, KV heads) per world size: KV heads split, one each, and replicated.
QKV_CASES = {2: [(4, 1), (4, 2), (4, 4)], 3: [(9, 3), (3, 1)]}


def _fill(layer: nn.Module, full: dict[str, list[torch.Tensor]]) -> None:
    """Give `layer` its share of the full tensors, as the loader does (one tensor per fused shard)."""
    for name, tensors in full.items():
        if hasattr(layer, "checkpoint_slice"):
            held = [layer.checkpoint_slice(name, None if len(tensors) == 1 else i, t).contiguous()
                    for i, t in enumerate(tensors)]
        else:
            held = tensors
        setattr(layer, name, nn.Parameter(torch.cat(held), requires_grad=False))


def _qkv_outputs(tp: TensorParallelGroup, num_heads: int, num_kv_heads: int) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    spec = AttentionLayerSpec(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=HEAD_DIM, scale=1.0)
    sizes = (num_heads * HEAD_DIM, num_kv_heads * HEAD_DIM, num_kv_heads * HEAD_DIM)
    weights = [torch.randn(size, HIDDEN) / HIDDEN**0.5 for size in sizes]
    x = torch.randn(TOKENS, HIDDEN)
    full = MergedLinear(HIDDEN, sizes)
    _fill(full, {"weight": weights})
    local = qkv_projection(HIDDEN, spec, tp)
    _fill(local, {"weight": weights})
    q, k, v = local(x).split(local.output_sizes, dim=-1)
    ref_q, ref_k, ref_v = full(x).split(sizes, dim=-1)
    spec_here = local_attention_spec(spec, tp)
    return {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "ref_q": ref_q.numpy(), "ref_k": ref_k.numpy(),
            "ref_v": ref_v.numpy(), "heads": np.array([spec_here.num_heads, spec_here.num_kv_heads])}


def _check_qkv(ranks: list[dict[str, np.ndarray]], world_size: int, num_heads: int, num_kv_heads: int) -> None:
    ref = ranks[0]
    q_heads = num_heads // world_size
    for rank, out in enumerate(ranks):
        assert np.array_equal(out["ref_q"], ref["ref_q"]), "the seeded full layer differs between ranks"
        # Rank r holds query heads [r * q_heads, (r + 1) * q_heads).
        assert np.array_equal(out["q"], ref["ref_q"][:, rank * q_heads * HEAD_DIM:(rank + 1) * q_heads * HEAD_DIM])
        if num_kv_heads >= world_size:
            kv_heads = num_kv_heads // world_size
            held = slice(rank * kv_heads * HEAD_DIM, (rank + 1) * kv_heads * HEAD_DIM)
        else:  # one KV head per rank, shared by world_size // num_kv_heads neighbouring ranks
            head = rank // (world_size // num_kv_heads)
            kv_heads, held = 1, slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
        assert np.array_equal(out["k"], ref["ref_k"][:, held])
        assert np.array_equal(out["v"], ref["ref_v"][:, held])
        assert out["heads"].tolist() == [q_heads, kv_heads]


def _mlp_outputs(tp: TensorParallelGroup, intermediate_size: int) -> dict[str, np.ndarray]:
    torch.manual_seed(1)
    gate, up = torch.randn(intermediate_size, HIDDEN) / HIDDEN**0.5, torch.randn(intermediate_size, HIDDEN) / HIDDEN**0.5
    down = torch.randn(HIDDEN, intermediate_size) / intermediate_size**0.5
    x = torch.randn(TOKENS, HIDDEN)
    full_gate_up, full_down = MergedLinear(HIDDEN, (intermediate_size,) * 2), Linear(intermediate_size, HIDDEN)
    _fill(full_gate_up, {"weight": [gate, up]})
    _fill(full_down, {"weight": [down]})
    local_gate_up, local_down = gate_up_projection(HIDDEN, intermediate_size, tp), row_projection(
        intermediate_size, HIDDEN, tp)
    _fill(local_gate_up, {"weight": [gate, up]})
    _fill(local_down, {"weight": [down]})
    ref_gate, ref_up = full_gate_up(x).chunk(2, dim=-1)
    local_gate, local_up = local_gate_up(x).chunk(2, dim=-1)
    hidden = torch.nn.functional.silu(local_gate) * local_up
    return {"gate": local_gate.numpy(), "up": local_up.numpy(), "ref_gate": ref_gate.numpy(),
            "ref_up": ref_up.numpy(), "down": local_down(hidden).numpy(),
            "ref_down": full_down(torch.nn.functional.silu(ref_gate) * ref_up).numpy()}


def test_gate_up_column_parallel_exact_and_down_row_parallel_close(layer_outputs: tuple[int, list[dict]]) -> None:
    world_size, outputs = layer_outputs
    ranks = [out["mlp"] for out in outputs]
    rows = INTERMEDIATE // world_size
    ref = ranks[0]
    for rank, out in enumerate(ranks):
        # Each rank's [gate | up] holds the same rows of gate and of up, so chunk(2) still separates them.
        assert np.array_equal(out["gate"], ref["ref_gate"][:, rank * rows:(rank + 1) * rows])
        assert np.array_equal(out["up"], ref["ref_up"][:, rank * rows:(rank + 1) * rows])
        assert np.array_equal(out["down"], ref["down"]), "ranks disagree after the all-reduce"
    np.testing.assert_allclose(ref["down"], ref["ref_down"], rtol=0, atol=ROW_ATOL)


def _row_bias_outputs(tp: TensorParallelGroup) -> dict[str, np.ndarray]:
    torch.manual_seed(2)
    weight, bias, x = torch.randn(HIDDEN, 48) / 48**0.5, torch.randn(HIDDEN), torch.randn(TOKENS, 48)
    full = Linear(48, HIDDEN, bias=True)
    _fill(full, {"weight": [weight], "bias": [bias]})
    local = row_projection(48, HIDDEN, tp)
    local.bias = nn.Parameter(torch.empty(HIDDEN), requires_grad=False)  # the decoders' projections are bias-free
    _fill(local, {"weight": [weight], "bias": [bias]})
    shard = 48 // tp.world_size
    return {"out": local(x[:, tp.rank * shard:(tp.rank + 1) * shard]).numpy(), "ref": full(x).numpy()}


def test_row_parallel_adds_the_bias_once(layer_outputs: tuple[int, list[dict]]) -> None:
    ranks = [out["row_bias"] for out in layer_outputs[1]]
    for out in ranks:
        assert np.array_equal(out["out"], ranks[0]["out"])
    np.testing.assert_allclose(ranks[0]["out"], ranks[0]["ref"], rtol=0, atol=ROW_ATOL)


def _embedding_outputs(tp: TensorParallelGroup, vocab_size: int) -> dict[str, np.ndarray]:
    torch.manual_seed(3)
    table = torch.randn(vocab_size, HIDDEN)
    ids = torch.cat([torch.arange(vocab_size), torch.randint(0, vocab_size, (50,))])
    full = vocab_embedding(vocab_size, HIDDEN, SINGLE_RANK)
    _fill(full, {"weight": [table]})
    local = vocab_embedding(vocab_size, HIDDEN, tp)
    _fill(local, {"weight": [table]})
    return {"out": local(ids).numpy(), "ref": full(ids).numpy(), "rows": np.array(local.weight.shape[0])}


def test_vocab_parallel_embedding_is_exact(layer_outputs: tuple[int, list[dict]]) -> None:
    world_size, outputs = layer_outputs
    ranks = [out["embedding"] for out in outputs]
    for out in ranks:
        assert np.array_equal(out["out"], ranks[0]["ref"])
        assert int(out["rows"]) == -(-VOCAB // world_size)


def _layer_outputs(tp: TensorParallelGroup) -> dict:
    """Every layer check's outputs, from one process group per world size (spawning ranks is the slow part)."""
    return {"qkv": [_qkv_outputs(tp, *case) for case in QKV_CASES[tp.world_size]],
            "mlp": _mlp_outputs(tp, INTERMEDIATE), "row_bias": _row_bias_outputs(tp),
            "embedding": _embedding_outputs(tp, VOCAB)}


@pytest.fixture(scope="module", params=[2, 3], ids=["tp2", "tp3"])
def layer_outputs(request: pytest.FixtureRequest) -> tuple[int, list[dict]]:
    return request.param, run_ranks(request.param, _layer_outputs)


def test_qkv_column_parallel_is_bit_exact(layer_outputs: tuple[int, list[dict]]) -> None:
    world_size, outputs = layer_outputs
    for index, (num_heads, num_kv_heads) in enumerate(QKV_CASES[world_size]):
        _check_qkv([out["qkv"][index] for out in outputs], world_size, num_heads, num_kv_heads)


def _stalled_peer(tp: TensorParallelGroup) -> dict[str, float | str]:
    if tp.rank == 1:
        time.sleep(4.0)  # a peer that stopped answering (as under SIGSTOP)
        return {}
    start = time.monotonic()
    try:
        tp.all_reduce(torch.ones(4))
    except RuntimeError as err:
        return {"elapsed": time.monotonic() - start, "error": str(err)}
    return {"elapsed": time.monotonic() - start, "error": ""}


def test_process_group_timeout_bounds_a_stalled_peer() -> None:
    rank0, _ = run_ranks(2, _stalled_peer, pg_timeout_s=2.0, deadline_s=60.0)
    assert rank0["error"], "the all-reduce with a stalled peer returned instead of timing out"
    assert 1.5 <= rank0["elapsed"] < 5.0


def test_single_rank_needs_no_process_group() -> None:
    group = init_tensor_parallel(0, 1, "tcp://127.0.0.1:1", torch.device("cpu"))
    assert group is SINGLE_RANK and not torch.distributed.is_initialized()
    x = torch.randn(3, 5)
    assert group.all_reduce(x) is x and group.all_gather(x) is x


def test_bad_rank_or_timeout_is_refused() -> None:
    with pytest.raises(ValueError, match="rank 2 is not in a tensor-parallel world of size 2"):
        init_tensor_parallel(2, 2, "tcp://127.0.0.1:1", torch.device("cpu"))
    with pytest.raises(ValueError, match="timeout_s must be positive"):
        init_tensor_parallel(0, 2, "tcp://127.0.0.1:1", torch.device("cpu"), timeout_s=0)

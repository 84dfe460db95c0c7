"""Worker layer: paged attention over a flat ragged batch.

Each layer writes the step's new keys and values into its paged KV tensor at
the slots the scheduler assigned, then attends over the blocks each request
needs. Requests with one query token (decodes) are batched: on CPU a native
kernel reads their blocks in place (`cpu_decode_attention`); elsewhere, or
when the kernel cannot be built, the portable path gathers their blocks and
runs one padded, masked attention. Requests with many query tokens (prefill
chunks) are attended one by one with a causal mask offset by their computed
tokens, in tiles of queries, each against only the keys it can see.
Sliding-window groups only gather the blocks inside the window, so their cost
stays flat as a sequence grows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pagoda.models.interfaces import AttentionLayerSpec
from pagoda.worker.attention.cpu_decode_attention import load_cpu_decode_attention


@dataclass
class DecodeMetadata:
    token_indices: torch.Tensor  # [Rd] positions in the flat batch
    block_ids: torch.Tensor  # [Rd, num_blocks]
    mask: torch.Tensor  # [Rd, 1, 1, num_blocks * block_size] bool, True = attend
    key_ranges: torch.Tensor  # [Rd, 2] int64: the keys `mask` allows, as [begin, end) over the listed blocks


@dataclass
class QueryTile:
    """Prefill queries attended together, against only the keys some query of them sees (see metadata.py)."""

    query_begin: int  # [query_begin, query_end) of the request's scheduled tokens
    query_end: int
    key_begin: int  # [key_begin, key_end) of its gathered keys: every key some query of the tile sees
    key_end: int


@dataclass
class PrefillMetadata:
    token_start: int
    token_end: int
    block_ids: torch.Tensor  # [num_blocks]
    mask: torch.Tensor  # [num_query_tokens, num_blocks * block_size] bool
    tiles: list[QueryTile]


@dataclass
class GroupAttentionMetadata:
    """Everything one KV cache group's layers need for this step."""

    slot_mapping: torch.Tensor  # [T] slot of each new token: block_id * block_size + offset
    decode: DecodeMetadata | None
    prefills: list[PrefillMetadata]


class PagedAttention:
    """The models' `AttentionContext` for one step: routes each layer to its group's metadata."""

    def __init__(
        self,
        layer_specs: list[AttentionLayerSpec],
        layer_kv_caches: list[torch.Tensor],
        layer_groups: list[int],
        group_metadata: list[GroupAttentionMetadata],
    ) -> None:
        self._layer_specs = layer_specs
        self._layer_kv_caches = layer_kv_caches  # per layer: [2, num_blocks, block_size, kv_heads, head_dim]
        self._layer_groups = layer_groups
        self._group_metadata = group_metadata
        on_cpu = bool(layer_kv_caches) and layer_kv_caches[0].device.type == "cpu"
        self._decode_kernel = load_cpu_decode_attention() if on_cpu else None

    def forward(self, layer_index: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        spec = self._layer_specs[layer_index]
        metadata = self._group_metadata[self._layer_groups[layer_index]]
        kv_cache = self._layer_kv_caches[layer_index]
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        write_kv(key_cache, value_cache, key, value, metadata.slot_mapping)
        query = query.contiguous()
        output = torch.empty_like(query)
        decode = metadata.decode
        if decode is not None and self._decode_kernel is not None and self._decode_kernel.supports(query, key_cache):
            self._decode_kernel(query, key_cache, value_cache, output, decode, spec)
        elif decode is not None:
            q = query[decode.token_indices].unsqueeze(2)  # [Rd, H, 1, D]
            k = _gather(key_cache, decode.block_ids)
            # Rows shorter than the longest gather slots never written (the cache is not zeroed): a masked
            # key's weight is 0, but 0 * NaN is not, so its value must be 0 too. `v` is a fresh copy.
            v = _gather(value_cache, decode.block_ids).masked_fill_(~decode.mask.view(len(q), 1, -1, 1), 0)
            output[decode.token_indices] = attend(q, k, v, decode.mask, spec).squeeze(2)
        for prefill in metadata.prefills:
            q = query[prefill.token_start : prefill.token_end].transpose(0, 1)  # [H, n, D]
            k = _gather(key_cache, prefill.block_ids)
            v = _gather(value_cache, prefill.block_ids)
            for tile in prefill.tiles:
                queries, keys = slice(tile.query_begin, tile.query_end), slice(tile.key_begin, tile.key_end)
                output[prefill.token_start + tile.query_begin : prefill.token_start + tile.query_end] = attend(
                    q[:, queries], k[:, keys], v[:, keys], prefill.mask[queries, keys], spec).transpose(0, 1)
        return output


def write_kv(key_cache: torch.Tensor, value_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    num_kv_heads, head_dim = key_cache.shape[-2:]
    key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(key_cache.dtype))
    value_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value.to(value_cache.dtype))


def _gather(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Blocks -> [..., kv_heads, tokens, head_dim] (block_ids [..., nb])."""
    blocks = cache[block_ids]  # [..., nb, bs, kvh, D]
    shape = blocks.shape
    tokens = blocks.reshape(*shape[:-4], shape[-4] * shape[-3], shape[-2], shape[-1])
    return tokens.transpose(-3, -2)


# Above this many score elements per call, prefill queries are split into chunks.
_MAX_SCORE_ELEMENTS = 1 << 24


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
           spec: AttentionLayerSpec) -> torch.Tensor:
    """Masked attention with grouped KV heads; q [..., H, n, D], k/v [..., KVH, L, D], mask [..., n, L].

    CUDA uses `scaled_dot_product_attention`'s fused kernels. Elsewhere two
    batched matmuls are faster: on CPU, SDPA's flash kernel is several times
    slower for these shapes, most of all for one-token decodes with GQA.
    """
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    if q.device.type == "cuda" and spec.logit_softcap is None:
        return sdpa_attend(q, k, v, mask, spec)
    num_queries = q.shape[-2]
    chunk = max(1, _MAX_SCORE_ELEMENTS // (q.shape[-3] * k.shape[-2]))
    if num_queries <= chunk:
        return matmul_attend(q, k, v, mask, spec)
    parts = [
        matmul_attend(q[..., start : start + chunk, :], k, v, mask[..., start : start + chunk, :], spec)
        for start in range(0, num_queries, chunk)
    ]
    return torch.cat(parts, dim=-2)


def sdpa_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                spec: AttentionLayerSpec) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=spec.scale, enable_gqa=True)


def matmul_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                  spec: AttentionLayerSpec) -> torch.Tensor:
    """Scores as one matmul per KV head: the query heads sharing it are stacked as rows."""
    *batch, num_heads, num_queries, head_dim = q.shape
    num_kv_heads, num_keys = k.shape[-3], k.shape[-2]
    group = num_heads // num_kv_heads
    rows = q.reshape(*batch, num_kv_heads, group * num_queries, head_dim)
    scores = torch.matmul(rows, k.transpose(-1, -2)).float()
    scores = scores.view(*batch, num_kv_heads, group, num_queries, num_keys) * spec.scale
    if spec.logit_softcap is not None:
        scores = spec.logit_softcap * torch.tanh(scores / spec.logit_softcap)
    scores = scores.masked_fill(~mask.unsqueeze(-3), -math.inf)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.matmul(probs.view(*batch, num_kv_heads, group * num_queries, num_keys), v)
    return out.view(*batch, num_heads, num_queries, head_dim)

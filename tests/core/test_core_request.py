"""Request bookkeeping, statuses and the opaque KVCacheBlocks."""

from __future__ import annotations

from core_helpers import make_request

from pagoda.core.block_hash import get_request_block_hasher, sha256_cbor
from pagoda.core.block_pool import KVCacheBlock
from pagoda.core.kv_cache_manager import KVCacheBlocks
from pagoda.core.outputs import FinishReason
from pagoda.core.request import RequestStatus


def test_statuses() -> None:
    unfinished = [
        RequestStatus.WAITING,
        RequestStatus.WAITING_FOR_REMOTE_KVS,
        RequestStatus.RUNNING,
        RequestStatus.PREEMPTED,
    ]
    assert not any(RequestStatus.is_finished(status) for status in unfinished)
    assert all(RequestStatus.get_finished_reason(status) is None for status in unfinished)
    assert {status: RequestStatus.get_finished_reason(status) for status in RequestStatus if status.is_finished(status)} == {
        RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
        RequestStatus.FINISHED_LENGTH_CAPPED: FinishReason.LENGTH,
        RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
        RequestStatus.FINISHED_ERROR: FinishReason.ERROR,
    }


def test_request_counts_and_lifecycle() -> None:
    request = make_request("r", [5, 6, 7], block_size=None, max_tokens=None)
    assert request.status == RequestStatus.WAITING and not request.is_finished()
    assert request.max_tokens is None and request.num_cached_tokens == -1
    assert (request.num_tokens, request.num_prompt_tokens, request.num_output_tokens) == (3, 3, 0)
    assert request.block_hashes == [] and not request.has_block_hasher
    request.append_output_token_ids([8, 9])
    assert request.output_token_ids == [8, 9] and request.all_token_ids == [5, 6, 7, 8, 9]
    assert request.prompt_token_ids == [5, 6, 7]
    request.set_block_hasher(get_request_block_hasher(4, sha256_cbor))
    assert len(request.block_hashes) == 1 and request.has_block_hasher
    assert request.block_hashes == make_request("y", [5, 6, 7, 8, 9]).block_hashes
    request.status = RequestStatus.FINISHED_ABORTED
    assert request.is_finished() and request.get_finished_reason() == FinishReason.ABORT


def test_kv_cache_blocks_concatenate_per_group() -> None:
    blocks = [KVCacheBlock(i) for i in range(6)]
    first = KVCacheBlocks(([blocks[1]], [blocks[2], blocks[3]]))
    second = KVCacheBlocks(([blocks[4]], [blocks[5]]))
    assert (first + second).get_block_ids() == ([1, 4], [2, 3, 5])
    assert not first.is_empty() and KVCacheBlocks(([], [])).is_empty()

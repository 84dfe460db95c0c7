"""The intrusive free queue: order, O(1) removal from the middle, batch operations."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagoda.core.block_pool import FreeKVCacheBlockQueue, KVCacheBlock


def ids(queue: FreeKVCacheBlockQueue) -> list[int]:
    return [block.block_id for block in queue.get_all_free_blocks()]


def make_queue(n: int) -> tuple[list[KVCacheBlock], FreeKVCacheBlockQueue]:
    blocks = [KVCacheBlock(i) for i in range(n)]
    return blocks, FreeKVCacheBlockQueue(blocks)


def test_initial_order_and_links() -> None:
    blocks, queue = make_queue(4)
    assert ids(queue) == [0, 1, 2, 3]
    assert queue.num_free_blocks == 4
    assert blocks[0].prev_free_block is queue.fake_free_list_head
    assert blocks[3].next_free_block is queue.fake_free_list_tail
    assert blocks[1].prev_free_block is blocks[0] and blocks[1].next_free_block is blocks[2]


def test_remove_from_middle_keeps_order() -> None:
    blocks, queue = make_queue(5)
    queue.remove(blocks[2])
    assert ids(queue) == [0, 1, 3, 4]
    assert blocks[2].prev_free_block is None and blocks[2].next_free_block is None
    assert blocks[1].next_free_block is blocks[3]
    queue.remove(blocks[0])
    queue.remove(blocks[4])
    assert ids(queue) == [1, 3]
    assert queue.num_free_blocks == 2


def test_remove_twice_is_an_error() -> None:
    blocks, queue = make_queue(3)
    queue.remove(blocks[1])
    with pytest.raises(RuntimeError, match="block 1"):
        queue.remove(blocks[1])


def test_popleft_and_append() -> None:
    blocks, queue = make_queue(3)
    assert queue.popleft() is blocks[0]
    queue.append(blocks[0])
    assert ids(queue) == [1, 2, 0]
    for _ in range(3):
        queue.popleft()
    assert queue.num_free_blocks == 0 and ids(queue) == []
    with pytest.raises(ValueError):
        queue.popleft()


def test_popleft_n_and_append_n() -> None:
    blocks, queue = make_queue(6)
    popped = queue.popleft_n(4)
    assert [b.block_id for b in popped] == [0, 1, 2, 3]
    assert all(b.prev_free_block is None and b.next_free_block is None for b in popped)
    assert ids(queue) == [4, 5] and queue.num_free_blocks == 2
    queue.append_n([popped[3], popped[1]])
    assert ids(queue) == [4, 5, 3, 1]
    assert queue.popleft_n(0) == []
    assert [b.block_id for b in queue.popleft_n(4)] == [4, 5, 3, 1]
    assert ids(queue) == [] and queue.num_free_blocks == 0
    queue.append_n([blocks[2]])
    assert ids(queue) == [2]
    with pytest.raises(ValueError):
        queue.popleft_n(2)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_matches_a_list_model(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 12))
    blocks, queue = make_queue(n)
    model = list(range(n))
    held = []
    for _ in range(data.draw(st.integers(0, 30))):
        op = data.draw(st.sampled_from(["popleft_n", "remove", "append_n"]))
        if op == "popleft_n":
            k = data.draw(st.integers(0, len(model)))
            popped = [b.block_id for b in queue.popleft_n(k)]
            assert popped == model[:k]
            model, held = model[k:], held + popped
        elif op == "remove" and model:
            block_id = data.draw(st.sampled_from(model))
            queue.remove(blocks[block_id])
            model.remove(block_id)
            held.append(block_id)
        elif op == "append_n" and held:
            chosen = data.draw(st.lists(st.sampled_from(held), unique=True))
            queue.append_n([blocks[i] for i in chosen])
            model += chosen
            held = [i for i in held if i not in chosen]
        assert ids(queue) == model
        assert queue.num_free_blocks == len(model)

"""Worker layer: per-row block ids of the persistent batch, one table per KV cache group."""

from __future__ import annotations

import numpy as np


class BlockTable:
    """Block ids of each batch row in one KV cache group (numpy, on the host)."""

    def __init__(self, max_num_reqs: int, max_num_blocks_per_req: int) -> None:
        self.block_ids = np.zeros((max_num_reqs, max_num_blocks_per_req), dtype=np.int64)
        self.num_blocks = np.zeros(max_num_reqs, dtype=np.int64)

    def set_row(self, row: int, block_ids: list[int]) -> None:
        self.num_blocks[row] = 0
        self.append_row(row, block_ids)

    def append_row(self, row: int, block_ids: list[int]) -> None:
        if not block_ids:
            return
        start = int(self.num_blocks[row])
        end = start + len(block_ids)
        if end > self.block_ids.shape[1]:
            raise ValueError(f"a request needs {end} blocks, more than max_model_len allows")
        self.block_ids[row, start:end] = block_ids
        self.num_blocks[row] = end

    def move_row(self, src: int, dst: int) -> None:
        count = int(self.num_blocks[src])
        self.block_ids[dst, :count] = self.block_ids[src, :count]
        self.num_blocks[dst] = count


class MultiGroupBlockTable:
    def __init__(self, max_num_reqs: int, max_num_blocks_per_req: int, num_groups: int) -> None:
        self.tables = [BlockTable(max_num_reqs, max_num_blocks_per_req) for _ in range(num_groups)]

    def set_row(self, row: int, block_ids: tuple[list[int], ...]) -> None:
        for table, ids in zip(self.tables, block_ids):
            table.set_row(row, ids)

    def append_row(self, row: int, block_ids: tuple[list[int], ...]) -> None:
        for table, ids in zip(self.tables, block_ids):
            table.append_row(row, ids)

    def move_row(self, src: int, dst: int) -> None:
        for table in self.tables:
            table.move_row(src, dst)

    def __getitem__(self, group_index: int) -> BlockTable:
        return self.tables[group_index]

"""End to end: the disk tier on a filesystem that is really full (ENOSPC), not just over the tier's own budget.

The test mounts an 8 MiB tmpfs and gives the disk tier a 1 GiB budget on
it, so the kernel refuses writes long before the tier would: PROMPT's 72
entries of ~0.5 MiB do not fit. Requests still complete with the cold run's
output, with one warning; once the filesystem grows (a remount), the next
run saves what was refused and the one after loads all of PROMPT from disk.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from store_helpers import NUM_STORED, PROMPT, generate_one, store_engine, store_warnings

pytestmark = pytest.mark.slow

SMALL, LARGE = "8m", "64m"
ENTRIES_PER_PROMPT = 72  # 4 chunks x 18 layers


def mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@pytest.fixture
def tiny_filesystem(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs, unmounted after the test whatever happens."""
    mount_point = tmp_path / "tiny-fs"
    mount_point.mkdir()
    try:
        result = mount("-t", "tmpfs", "-o", f"size={SMALL}", "pagoda-test-tmpfs", str(mount_point))
    except FileNotFoundError:
        pytest.skip("no mount command: cannot make a real full filesystem")
    if result.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here (needs root or CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


def test_a_full_filesystem_drops_saves_with_one_warning_and_is_used_once_it_has_room(gemma_path, tiny_filesystem,
                                                                                   cold, caplog):
    llm = store_engine(gemma_path, f"disk:{tiny_filesystem / 'kv'}:1GiB")
    caplog.set_level(logging.WARNING)
    try:
        for _ in range(2):
            assert llm.reset_prefix_cache()
            out = generate_one(llm, PROMPT)
            assert llm.flush_kv_store()
            assert out.outputs[0].token_ids == cold["full"]
        warnings = store_warnings(caplog.records)
        assert len(warnings) == 1 and "No space left on device" in warnings[0], warnings
        refused = llm.get_metrics()["kv_store.disk.failed_puts"]
        assert refused >= ENTRIES_PER_PROMPT // 2

        result = mount("-o", f"remount,size={LARGE}", str(tiny_filesystem))
        assert result.returncode == 0, result.stderr
        assert llm.reset_prefix_cache()
        assert generate_one(llm, PROMPT).outputs[0].token_ids == cold["full"]
        assert llm.flush_kv_store()
        assert llm.get_metrics()["kv_store.disk.failed_puts"] == refused
        assert llm.reset_prefix_cache()
        hit = generate_one(llm, PROMPT)
        assert hit.outputs[0].token_ids == cold["full"]
        assert hit.metrics.kv_store_tokens == {"disk": NUM_STORED}
    finally:
        llm.shutdown()

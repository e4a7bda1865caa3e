"""The background SHA-256 of statistics files: same digest as a direct hash, errors surface at result()."""

from __future__ import annotations

import hashlib
import os

import pytest

from lorablocks.errors import LoraBlocksError
from lorablocks.files.records import PendingDigest, sha256_file


def test_pending_digests_match_direct_hashes_in_order(tmp_path):
    paths = []
    for i in range(4):
        p = tmp_path / f"f{i}.bin"
        p.write_bytes(os.urandom(3 << 20) + bytes([i]))  # several chunks; each file differs
        paths.append(p)
    pending = [PendingDigest(p) for p in paths]
    got = [d.result() for d in pending]
    assert got == [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    assert got == [sha256_file(p) for p in paths]
    assert len(set(got)) == 4
    assert pending[0].result() == got[0]  # result() can be asked again


def test_a_missing_file_fails_at_result_with_one_line(tmp_path):
    digest = PendingDigest(tmp_path / "gone.bin")
    with pytest.raises(LoraBlocksError, match="cannot read .*gone.bin") as info:
        digest.result()
    assert "\n" not in str(info.value)

"""Checkpoint bookkeeping without DeepSpeed: manifest checks, checksums, retention choice and deletion, ZeRO pinning.

The DeepSpeed side (real saves, a SIGKILL in the middle of one, a truncated shard) is in tests/test_resume.py.
"""

from __future__ import annotations

from hpcds.train import checkpoint as ck


def test_tag_names_round_trip():
    assert ck.tag_for(120) == "step_120"
    assert ck.step_of("step_120") == 120
    assert ck.step_of("global_step5") is None
    assert ck.step_of("step_12.tmp") is None


def test_manifest_lists_sizes_checksums_and_total():
    manifest = ck.render_manifest(8, {"b.pt": (10, 7), "a.pt": (5, 3)}, zero_stage=2, world_size=2)
    assert list(manifest["files"]) == ["a.pt", "b.pt"]
    assert manifest["total_bytes"] == 15
    assert manifest["files"]["b.pt"] == {"size_bytes": 10, "crc32": 7}
    assert manifest["zero_stage"] == 2 and manifest["step"] == 8


def test_listing_checks_name_every_problem():
    manifest = ck.render_manifest(4, {"a.pt": (5, 1), "b.pt": (10, 2)})
    assert ck.check_listing(manifest, True, {"a.pt": 5, "b.pt": 10, "manifest.json": 99}) == []
    assert "COMMITTED" in ck.check_listing(manifest, False, {"a.pt": 5, "b.pt": 10})[0]
    assert ck.check_listing(None, True, {}) == ["manifest.json is missing or unreadable"]
    problems = ck.check_listing(manifest, True, {"a.pt": 4})
    assert problems == ["a.pt has 4 bytes, the manifest says 5", "b.pt is missing"]


def test_checksum_check_names_the_corrupt_file():
    manifest = ck.render_manifest(4, {"a.pt": (5, 1), "b.pt": (10, 2)})
    assert ck.check_checksums(manifest, {"a.pt": 1, "b.pt": 2}) == []
    assert ck.check_checksums(manifest, {"a.pt": 1, "b.pt": 3}) == ["b.pt fails its checksum (corrupt or overwritten)"]


def test_crc32_file_matches_zlib(tmp_path):
    import zlib

    data = bytes(range(256)) * 40_000  # spans several read chunks
    (tmp_path / "x").write_bytes(data)
    assert ck.crc32_file(tmp_path / "x") == zlib.crc32(data)


def test_retention_keeps_last_k_best_final_and_multiples():
    steps = [10, 20, 30, 40, 50, 60]
    assert ck.choose_retained(steps, keep_last=2) == {50, 60}
    assert ck.choose_retained(steps, keep_last=2, best_step=20) == {20, 50, 60}
    assert ck.choose_retained(steps, keep_last=1, final_step=60, best_step=99) == {60}  # best not on disk: ignored
    assert ck.choose_retained(steps, keep_last=1, keep_every_steps=25) == {50, 60}
    assert ck.choose_retained([], keep_last=3) == set()


def test_deletion_spares_the_newest_broken_folder_only():
    # 35 is a broken leftover older than the newest commit: garbage. 70 is newer: a save in progress.
    assert ck.choose_deleted([10, 20, 30, 35, 40, 70], [10, 20, 30, 40], {30, 40}) == [10, 20, 35]
    assert ck.choose_deleted([5, 8], [], set()) == []  # nothing committed yet: never delete


def _fake_checkpoint(folder, committed=True):
    folder.mkdir(parents=True)
    (folder / "shard.pt").write_bytes(b"x" * 100)
    if committed:
        (folder / ck.COMMITTED).write_text("1\n")


def test_apply_retention_deletes_on_disk(tmp_path):
    for step in (10, 20, 30):
        _fake_checkpoint(tmp_path / ck.tag_for(step))
    _fake_checkpoint(tmp_path / "step_25", committed=False)
    deleted = ck.apply_retention(tmp_path, lambda committed: ck.choose_retained(committed, keep_last=1, best_step=10))
    assert deleted == ["step_20", "step_25"]
    assert ck.list_tags(tmp_path) == ["step_30", "step_10"]

"""Checkpoint bookkeeping without DeepSpeed: expected files, manifest checks, checksums, retention choice and deletion,
and resume's verification on one gloo rank (setting rejected checkpoints aside).

The DeepSpeed side (real saves checked against `expected_files`, a listing that lacks a file or holds a stray one, a
SIGKILL in the middle of a save, a truncated shard, retention after a rejected checkpoint) is in tests/test_resume.py.
"""

from __future__ import annotations

import json
import zlib

import pytest

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


def test_expected_files_follow_deepspeeds_names_per_stage():
    states = {"rank_0_state.pt", "rank_1_state.pt"}
    plain = ck.expected_files(2, zero_stage=0, bf16=False, partitioned_optimizer=False)
    assert plain == ck.Expected(frozenset({"mp_rank_00_model_states.pt"} | states))
    zero2 = ck.expected_files(2, zero_stage=2, bf16=True, partitioned_optimizer=True)
    assert (
        zero2.files
        == {
            "mp_rank_00_model_states.pt",
            "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        }
        | states
    )
    zero3 = ck.expected_files(2, zero_stage=3, bf16=False, partitioned_optimizer=True, nvme_optimizer=True)
    assert (
        zero3.files
        == {
            "zero_pp_rank_0_mp_rank_00_model_states.pt",
            "zero_pp_rank_1_mp_rank_00_model_states.pt",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        }
        | states
    )
    assert zero3.folders == {"offloaded_tensors/rank00", "offloaded_tensors/rank01"}


def test_written_check_names_missing_and_stray_files():
    expected = ck.expected_files(2, zero_stage=1, bf16=False, partitioned_optimizer=True)
    assert ck.check_written(expected, expected.files) == []
    # Rank 1's optimizer file not (yet) in rank 0's listing, and a file from an earlier save on 3 ranks still there.
    listed = (expected.files - {"zero_pp_rank_1_mp_rank_00_optim_states.pt"}) | {
        "zero_pp_rank_2_mp_rank_00_optim_states.pt"
    }
    assert ck.check_written(expected, listed) == [
        "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing",
        "zero_pp_rank_2_mp_rank_00_optim_states.pt was not written by this save",
    ]


def test_written_check_takes_any_file_in_an_nvme_copy_but_not_an_empty_one():
    expected = ck.expected_files(2, zero_stage=3, bf16=False, partitioned_optimizer=True, nvme_optimizer=True)
    swapped = {"offloaded_tensors/rank00/0.tensor.swp", "offloaded_tensors/rank01/0.tensor.swp"}
    assert ck.check_written(expected, expected.files | swapped) == []
    assert ck.check_written(expected, expected.files | {"offloaded_tensors/rank00/0.tensor.swp"}) == [
        "offloaded_tensors/rank01/ holds no file"
    ]
    assert ck.check_written(expected, expected.files | swapped | {"offloaded_tensors/rank02/0.tensor.swp"}) == [
        "offloaded_tensors/rank02/0.tensor.swp was not written by this save"
    ]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """A real one-rank gloo process group: find_resumable's collectives run as they do on every rank of a job."""
    dist = pytest.importorskip("torch.distributed")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    store = tmp_path_factory.mktemp("store") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _real_checkpoint(ckpt_dir, step, *, committed=True):
    """A checkpoint folder as `save` leaves it: files, a manifest with their sizes and CRC-32s, the marker."""
    folder = ckpt_dir / ck.tag_for(step)
    folder.mkdir(parents=True)
    files = {}
    for rel in ("mp_rank_00_model_states.pt", ck.rank_state_name(0)):
        data = f"{rel} at step {step}".encode() * 100
        (folder / rel).write_bytes(data)
        files[rel] = (len(data), zlib.crc32(data))
    (folder / ck.MANIFEST).write_text(json.dumps(ck.render_manifest(step, files)))
    if committed:
        (folder / ck.COMMITTED).write_text("1\n")
    return folder


def _flip_a_byte(path):
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))


def test_resume_sets_committed_rejects_aside_and_never_picks_them(one_rank, tmp_path):
    _real_checkpoint(tmp_path, 2)
    _flip_a_byte(_real_checkpoint(tmp_path, 6) / "mp_rank_00_model_states.pt")  # committed, fails its checksum
    _real_checkpoint(tmp_path, 8, committed=False)  # a save cut short: retention never counts it anyway
    (tmp_path / "step_6.bad").mkdir()  # set aside by an earlier start: the new reject gets the next free name

    found = ck.find_resumable(tmp_path, rank=0, world=1)
    assert found.tag == "step_2"
    assert [tag for tag, _ in found.skipped] == ["step_8", "step_6"]
    assert found.set_aside == {"step_6": "step_6.bad.2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2", "step_6.bad", "step_6.bad.2", "step_8"]

    again = ck.find_resumable(tmp_path, rank=0, world=1)
    assert again.tag == "step_2" and [tag for tag, _ in again.skipped] == ["step_8"] and again.set_aside == {}


def test_retention_neither_counts_nor_deletes_set_aside_folders(tmp_path):
    for step in (2, 4):
        _fake_checkpoint(tmp_path / ck.tag_for(step))
    _fake_checkpoint(tmp_path / "step_6.bad")  # committed marker and all: set aside, so not a checkpoint any more
    deleted = ck.apply_retention(tmp_path, lambda committed: ck.choose_retained(committed, keep_last=1))
    assert deleted == ["step_2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_4", "step_6.bad"]

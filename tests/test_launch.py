"""The launcher's pure parts, checked against DeepSpeed's own argument parser and hostfile reader."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcds import launch
from hpcds.errors import HpcdsError
from hpcds.render import parse_hostfile, render_hostfile


def test_node_argv_is_accepted_by_deepspeed_runner():
    runner = pytest.importorskip("deepspeed.launcher.runner")
    argv = launch.deepspeed_argv(
        Path("/runs/r1"), master_addr="n1", master_port=29517, hostfile=Path("/runs/r1/hostfile-17"), node_rank=1
    )
    assert argv[0] == "deepspeed"
    args = runner.parse_args(argv[1:])
    assert (args.hostfile, args.no_ssh, args.node_rank) == ("/runs/r1/hostfile-17", True, 1)
    assert (args.master_addr, args.master_port, args.no_local_rank, args.module) == ("n1", 29517, True, True)
    assert args.num_gpus == -1  # slots come from the hostfile; --num_gpus would override them
    assert (args.user_script, args.user_args) == ("hpcds.train", ["--run-dir", "/runs/r1"])


def test_local_argv_cpu_and_gpu():
    runner = pytest.importorskip("deepspeed.launcher.runner")
    cpu = launch.deepspeed_argv(Path("/r"), master_addr="127.0.0.1", master_port=1234, local_ranks=2)
    gpu = launch.deepspeed_argv(Path("/r"), master_addr="127.0.0.1", master_port=1234, local_ranks=4, gpu=True)
    assert "--num_accelerators" in cpu and "--num_gpus" in gpu
    assert runner.parse_args(cpu[1:]).num_gpus == 2
    assert runner.parse_args(gpu[1:]).num_gpus == 4
    assert "--hostfile" not in cpu and "--no_ssh" not in cpu


def test_argv_needs_a_mode():
    with pytest.raises(ValueError):
        launch.deepspeed_argv(Path("/r"), master_addr="a", master_port=1)
    with pytest.raises(ValueError):
        launch.deepspeed_argv(Path("/r"), master_addr="a", master_port=1, hostfile=Path("/h"))


def test_hostfile_text_matches_deepspeed_parser():
    runner = pytest.importorskip("deepspeed.launcher.runner")
    text = render_hostfile(["n1", "n2"], 2)
    assert dict(runner._parse_hostfile(text.splitlines())) == {"n1": 2, "n2": 2}
    assert parse_hostfile(text) == {"n1": 2, "n2": 2}


def test_parse_hostfile_rejects_what_deepspeed_rejects():
    assert parse_hostfile("# comment\n\nn1 slots=4\n") == {"n1": 4}
    for bad in ("n1\n", "n1 slots=x\n", "n1 slots=1\nn1 slots=1\n"):
        with pytest.raises(HpcdsError):
            parse_hostfile(bad)


def test_check_hostfile_refuses_missing_empty_or_mismatched(tmp_path):
    path = tmp_path / "hostfile-5"
    with pytest.raises(HpcdsError, match="missing"):
        launch.check_hostfile(path, ["n1", "n2"], 2)
    path.write_text("")
    with pytest.raises(HpcdsError, match="allocation"):
        launch.check_hostfile(path, ["n1", "n2"], 2)
    path.write_text("n1 slots=2\n")
    with pytest.raises(HpcdsError, match="allocation"):
        launch.check_hostfile(path, ["n1", "n2"], 2)
    path.write_text("n1 slots=2\nn2 slots=2\n")
    launch.check_hostfile(path, ["n1", "n2"], 2)


def test_node_rank_from_this_process_env():
    hosts = ["n1", "n2"]
    assert launch.node_rank_of(hosts, {"SLURMD_NODENAME": "n2", "SLURM_NODEID": "0"}) == 1
    assert launch.node_rank_of(hosts, {"SLURM_NODEID": "1"}) == 1
    with pytest.raises(HpcdsError, match="not in the allocation"):
        launch.node_rank_of(hosts, {"SLURMD_NODENAME": "n7"})


def test_launch_outside_slurm_is_a_clear_error(tmp_path):
    with pytest.raises(HpcdsError, match="inside a Slurm job"):
        launch.launch_node(tmp_path, env={})

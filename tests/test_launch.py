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
    gpu = launch.deepspeed_argv(Path("/r"), master_addr="127.0.0.1", master_port=1234, devices=[2, 3])
    assert "--num_accelerators" in cpu and "--num_gpus" not in gpu
    assert runner.parse_args(cpu[1:]).num_gpus == 2
    # DeepSpeed's runner, on a machine with 4 GPUs, keeps exactly the chosen two (its launcher then sets
    # CUDA_VISIBLE_DEVICES=2,3 for the ranks); --num_gpus would have meant 0 and 1.
    args = runner.parse_args(gpu[1:])
    assert runner.parse_inclusion_exclusion({"localhost": 4}, args.include, args.exclude) == {"localhost": [2, 3]}
    assert "--hostfile" not in cpu and "--no_ssh" not in cpu


def test_hpcds_run_chooses_gpus_from_the_flag_then_cuda_visible_devices():
    assert launch.local_devices(2, [1, 3], {"CUDA_VISIBLE_DEVICES": "0"}) == [1, 3]
    assert launch.local_devices(2, None, {"CUDA_VISIBLE_DEVICES": "5, 2,7"}) == [5, 2]
    assert launch.local_devices(2, None, {}) == [0, 1]
    for ranks, requested, env, message in [
        (2, None, {"CUDA_VISIBLE_DEVICES": "GPU-8f0c1a2b"}, "not a list of GPU indices"),
        (2, None, {"CUDA_VISIBLE_DEVICES": "3"}, "gives 1 GPU for 2 ranks"),
        (2, [1, 1], {}, "names a GPU twice"),
    ]:
        with pytest.raises(HpcdsError, match=message):
            launch.local_devices(ranks, requested, env)
    # The runner must count every GPU: the chosen ids are in the machine's numbering.
    env = launch._train_env({"CUDA_VISIBLE_DEVICES": "2,3", "PATH": "/bin"}, gpu=True, local=True)
    assert env == {"PATH": "/bin"}
    assert launch._train_env({"CUDA_VISIBLE_DEVICES": "1"}, gpu=True) == {"CUDA_VISIBLE_DEVICES": "1"}  # under srun


def test_hpcds_run_gpu_flags_that_disagree_are_refused_before_a_run_directory_exists(tmp_path):
    import subprocess
    import sys

    for args, message in [
        (["--gpus", "0,1", "--ranks", "3"], "--gpus names 2 GPUs but --ranks is 3"),
        (["--gpus", "0,x"], "not a list of GPU indices"),
    ]:
        argv = [sys.executable, "-m", "hpcds", "run", "--preset", "quickstart", "--runs-dir", str(tmp_path), *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []


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


def test_a_launcher_in_a_container_needs_no_scontrol_and_reports_another_version(tmp_path, monkeypatch, capsys):
    # Inside an image without scontrol: the hosts come from the batch script outside, and so does the version of the
    # hpcds that wrote it. (The exec is the one part replaced: a test cannot become DeepSpeed's launcher.)
    from hpcds import __version__, facts, runs
    from hpcds.spec import load_spec

    spec = load_spec(None, [], {"nodes": 2, "gpus_per_node": 0}, preset="quickstart")
    (tmp_path / facts.SPEC_FILE).write_text(spec.to_yaml())
    execs = []
    monkeypatch.setattr(launch.os, "execve", lambda *args: execs.append(args))
    monkeypatch.setattr(launch.signal, "pthread_sigmask", lambda *args: set())  # keep the test process's mask
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_NUM_NODES": "2", "SLURMD_NODENAME": "n2"}
    env |= {facts.NODES_ENV: "n1 n2", facts.OUTSIDE_VERSION_ENV: "0.0.1", facts.MASTER_PORT_ENV: "23456"}
    env[launch.PREFLIGHT_ENV] = "0"  # n1 does not exist here: the network check would fail the node (69)
    launch.launch_node(tmp_path, env={**env, "PATH": str(tmp_path)})  # no scontrol on this PATH
    ((_, argv, _),) = execs
    runner = pytest.importorskip("deepspeed.launcher.runner")
    args = runner.parse_args(argv[1:])
    assert (args.node_rank, args.master_addr, args.master_port) == (1, "n1", 23456)
    mismatch = [e for e in runs.read_events(tmp_path) if e["event"] == "version_mismatch"]
    assert [(e["outside"], e["inside"], e["host"]) for e in mismatch] == [("0.0.1", __version__, "n2")]
    assert "written by hpcds 0.0.1" in capsys.readouterr().err

"""Node lists expanded offline (submitit's parser behind a strict check), against a table of real formats and, where
Slurm's client is installed, against `scontrol show hostnames` itself; hostfiles and scripts for 1,024 nodes."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from hpcds import launch, nodelist
from hpcds.errors import HpcdsError

TABLE = [
    ("n1", ["n1"]),
    ("n[1-2]", ["n1", "n2"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),  # no padding: widths grow
    ("gpu[001-003,007],cpu-a[1-2]", ["gpu001", "gpu002", "gpu003", "gpu007", "cpu-a1", "cpu-a2"]),
    ("a[098-101]", ["a098", "a099", "a100", "a101"]),  # padding kept across the carry
    ("n[1-3],m5,q[2,4-5]", ["n1", "n2", "n3", "m5", "q2", "q4", "q5"]),
    ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
    ("node-[1-2]", ["node-1", "node-2"]),
    ("a,b", ["a", "b"]),
    ("n[1-2],n1", ["n1", "n2", "n1"]),  # Slurm keeps duplicates in a list; the hostfile renderer refuses them
]
# Text after the last bracket: submitit expands it as meant; Slurm 22.05's scontrol answers "Invalid hostlist" (Slurm
# itself never writes it that way: `node1-ib` has no trailing number, so Slurm lists such nodes one by one).
SUFFIXED = [
    ("node[1-2]-ib", ["node1-ib", "node2-ib"]),
    ("dgx-h100-[07-09].cluster", ["dgx-h100-07.cluster", "dgx-h100-08.cluster", "dgx-h100-09.cluster"]),
]

BAD = [
    ("n[10-8]", "backwards"),  # submitit: [] (silently); scontrol: Invalid range
    ("n[1-2", "never closed"),  # scontrol: "n]"
    ("n1]", "without"),  # scontrol and submitit: "n1]"
    ("n1,,n2", "empty host name"),  # submitit: an empty name
    ("n[ 1-2]", "characters"),  # submitit: n01, n02
    ("n[a-b]", "not a number"),
    ("n[[1]]", "nest"),
    ("", "empty node list"),
]


@pytest.mark.parametrize(("text", "hosts"), [*TABLE, *SUFFIXED])
def test_expand_table(text, hosts):
    assert nodelist.expand(text) == hosts


@pytest.mark.parametrize(("text", "why"), BAD)
def test_expand_refuses_with_the_reason(text, why):
    with pytest.raises(HpcdsError, match=why):
        nodelist.expand(text)


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="Slurm's scontrol is not installed")
@pytest.mark.parametrize(("text", "hosts"), TABLE)
def test_table_agrees_with_scontrol(text, hosts):
    # scontrol show hostnames expands locally; it still needs a configuration source, so any slurm.conf will do.
    done = subprocess.run(["scontrol", "show", "hostnames", text], capture_output=True, text=True, timeout=20)
    if done.returncode != 0 and "configuration" in done.stderr:
        pytest.skip(f"scontrol has no slurm.conf here: {done.stderr.strip()[:200]}")
    assert done.stdout.split() == hosts


@pytest.mark.parametrize(
    "hosts",
    [
        ["n1", "n2"],
        ["gpu001", "gpu002", "gpu003", "gpu007", "cpu-a1", "cpu-a2"],
        ["n9", "n10", "n11", "x", "n3"],
        nodelist.simulated_hosts(1024),
    ],
)
def test_compress_round_trips(hosts):
    assert nodelist.expand(nodelist.compress(hosts)) == hosts


def test_1024_nodes_hostfile_and_script():
    hosts = nodelist.simulated_hosts(1024)
    text = nodelist.compress(hosts)
    assert text == "gpu[0001-1024]"
    started = time.perf_counter()
    expanded = nodelist.expand(text)
    hostfile = launch.hostfile_text(expanded, 8)
    elapsed_s = time.perf_counter() - started
    assert launch.parse_hostfile(hostfile) == {host: 8 for host in hosts}
    runner = pytest.importorskip("deepspeed.launcher.runner")
    parsed = runner._parse_hostfile(hostfile.splitlines())
    assert list(parsed) == hosts and sum(parsed.values()) == 8192
    assert elapsed_s < 1.0, f"expanding and rendering 1,024 hosts took {elapsed_s:.3f} s"
    # Every node computes its own rank from its own name: the last one is 1023, the first is the master.
    assert launch.node_rank_of(expanded, {"SLURMD_NODENAME": "gpu1024", "SLURM_NODEID": "0"}) == 1023
    assert launch.deepspeed_argv(
        launch.Path("/r"),
        master_addr=expanded[0],
        master_port=launch.master_port_for_job(4242),
        hostfile=launch.Path("/r/hostfile-4242"),
        node_rank=1023,
    )[1:6] == ["--hostfile", "/r/hostfile-4242", "--no_ssh", "--node_rank", "1023"]


def test_1024_node_batch_script_renders():
    from hpcds.render import render_sbatch
    from hpcds.spec import load_spec

    spec = load_spec(
        "configs/quickstart.yaml",
        ["slurm.nodes=1024", "slurm.gpus_per_node=8", "slurm.ranks_per_node=8", "deepspeed.zero_stage=2"],
        {},
    )
    script = render_sbatch(spec, "/runs/big")
    assert "#SBATCH --nodes=1024" in script and "#SBATCH --gpus-per-node=8" in script
    assert "srun --ntasks-per-node=1" in script  # one launcher per node, whatever the node count

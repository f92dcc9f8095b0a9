"""Start DeepSpeed for a run: per node inside a Slurm job (`hpcds launch RUN_DIR`), or on this machine (`hpcds run`).

Inside a job, `srun --ntasks-per-node=1 hpcds launch RUN_DIR` runs this once per node. Each copy asks Slurm for the
allocation's hosts (or, in a container, takes them from the batch script outside), computes its own node rank in this
process (a `$SLURM_NODEID` expanded by the batch shell would be 0 on every node), compares what it runs with against
what submit recorded (hpcds.versions: a change is an `environment_changed` event, and under slurm.on_version_change:
fail the node exits EXIT_ENVIRONMENT_CHANGED), runs the node's pre-flight check (hpcds.preflight: a failing node logs
why and exits EXIT_UNHEALTHY before DeepSpeed starts), writes the DeepSpeed
hostfile `RUN_DIR/hostfile-<jobid>` (every node writes the same text, atomically), checks it, logs a `launch` event and
replaces itself with `deepspeed --hostfile H --no_ssh --node_rank R` on the rendezvous port the batch script picked,
so the node's exit code is DeepSpeed's. The stop signals (USR2, TERM, INT) are blocked first: the mask survives fork
and exec, so DeepSpeed's launchers, which die on USR2 and on TERM kill the ranks 30 s later, never react to the
signals Slurm sends to every process of the step; the trainer ranks unblock them once their flag handler is
installed, save at the next step boundary and exit 75, and the launchers exit with them. `deepspeed_argv` is the
pure part both paths share.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from hpcds import __version__, runs
from hpcds.errors import CommandError, HpcdsError
from hpcds.facts import (
    EXIT_ENVIRONMENT_CHANGED,
    EXIT_UNHEALTHY,
    MASTER_ADDR_ENV,
    MASTER_PORT_ENV,
    NODES_ENV,
    OUTSIDE_VERSION_ENV,
    SPEC_FILE,
    STOP_SIGNUMS,
)
from hpcds.render.hostfile import parse_hostfile, render_hostfile

TRAIN_MODULE = "hpcds.train"
# HPCDS_PREFLIGHT=0 skips the pre-flight check (hpcds.preflight) as slurm.preflight: false does.
PREFLIGHT_ENV = "HPCDS_PREFLIGHT"
# `hpcds run` looks for a Ctrl-C this often while it waits for the ranks.
WAIT_POLL_S = 0.2
MASTER_PORT_BASE = 29500


def deepspeed_argv(
    run_dir: Path,
    *,
    master_addr: str,
    master_port: int,
    hostfile: Path | None = None,
    node_rank: int | None = None,
    local_ranks: int | None = None,
    devices: Sequence[int] = (),
    deepspeed: str = "deepspeed",
) -> list[str]:
    """The DeepSpeed launcher's command line: per node from a hostfile (`node_rank` given), or local: `local_ranks`
    CPU processes, or one rank per GPU index in `devices`.

    With a hostfile the ranks per node come from its `slots=`; `--num_gpus` would override them, so it is left out.
    `--no_ssh` makes the launcher start only this node's ranks: no pdsh, no ssh, which clusters forbid. Local GPUs go
    as `--include localhost:<ids>`: with `--num_gpus` DeepSpeed's runner drops CUDA_VISIBLE_DEVICES and takes 0..N-1.
    """
    argv = [deepspeed]
    if hostfile is not None:
        if node_rank is None:
            raise ValueError("a hostfile launch needs node_rank")
        argv += ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank)]
    elif devices:
        argv += ["--include", "localhost:" + ",".join(map(str, devices))]
    elif local_ranks is not None:
        argv += ["--num_accelerators", str(local_ranks)]
    else:
        raise ValueError("give a hostfile and node_rank, local_ranks, or devices")
    argv += ["--master_addr", master_addr, "--master_port", str(master_port), "--no_local_rank"]
    return [*argv, "--module", TRAIN_MODULE, "--run-dir", str(run_dir)]


def device_ids(text: str) -> list[int] | None:
    """GPU indices from "0,1" (as --gpus and CUDA_VISIBLE_DEVICES write them); None when it is not such a list."""
    words = [word.strip() for word in text.split(",")]
    return [int(word) for word in words] if all(word.isdigit() for word in words) else None


def local_devices(ranks: int, requested: Sequence[int] | None, env: Mapping[str, str]) -> list[int]:
    """The GPU indices `hpcds run` trains on, one rank each: `--gpus`, else CUDA_VISIBLE_DEVICES (its first `ranks`),
    else 0..ranks-1."""
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if requested:
        ids, source = list(requested), "--gpus"
    elif visible:
        ids = device_ids(visible)
        if ids is None:
            raise HpcdsError(
                f"CUDA_VISIBLE_DEVICES={visible} is not a list of GPU indices, and DeepSpeed's launcher selects GPUs "
                "by index. hint: unset it and choose with hpcds run --gpus 0,1"
            )
        ids, source = ids[:ranks], f"CUDA_VISIBLE_DEVICES={visible}"
    else:
        ids, source = list(range(ranks)), "the spec's ranks"
    if len(set(ids)) != len(ids):
        raise HpcdsError(f"{source} names a GPU twice: {ids}")
    if len(ids) != ranks:
        raise HpcdsError(
            f"{source} gives {len(ids)} GPU{'s' if len(ids) != 1 else ''} for {ranks} ranks (one rank per GPU). "
            f"hint: hpcds run --ranks {len(ids)}, or name {ranks} GPUs with --gpus"
        )
    return ids


def rendezvous_port(env: Mapping[str, str]) -> int:
    """The rendezvous port the batch script picked free on the first node (the same on every node: srun passes it).

    A batch script rendered before hpcds picked ports has none: then the port comes from the job id, as it did.
    """
    picked = env.get(MASTER_PORT_ENV, "")
    if picked.isdigit() and 0 < int(picked) < 65536:
        return int(picked)
    return MASTER_PORT_BASE + int(env["SLURM_JOB_ID"]) % 10000


def node_rank_of(hosts: Sequence[str], env: Mapping[str, str]) -> int:
    """This node's index in the allocation, from SLURMD_NODENAME (or SLURM_NODEID when the name is unknown)."""
    name = env.get("SLURMD_NODENAME")
    if name and name in hosts:
        return list(hosts).index(name)
    node_id = env.get("SLURM_NODEID")
    if node_id is not None and node_id.isdigit() and int(node_id) < len(hosts):
        return int(node_id)
    raise HpcdsError(
        f"this node ({name or 'SLURMD_NODENAME unset'}, SLURM_NODEID={node_id}) is not in the allocation "
        f"{list(hosts)}; hpcds launch must run under srun inside the job (one task per node)"
    )


def check_hostfile(path: Path, hosts: Sequence[str], slots: int) -> None:
    """DeepSpeed silently runs on localhost alone when its hostfile is missing: refuse instead."""
    try:
        found = parse_hostfile(path.read_text())
    except FileNotFoundError:
        raise HpcdsError(
            f"hostfile {path} is missing after writing it; is the run directory on a shared filesystem?"
        ) from None
    expected = {host: slots for host in hosts}
    if found != expected:
        raise HpcdsError(f"hostfile {path} lists {found}, but the allocation is {expected}")


def _deepspeed_executable() -> str:
    beside = Path(sys.executable).parent / "deepspeed"
    found = str(beside) if beside.is_file() else shutil.which("deepspeed")
    if not found:
        raise CommandError(["deepspeed"], None, "not found", hint="install DeepSpeed in this environment")
    return found


def _job_spec(run_dir: Path):
    from hpcds.spec import load_spec

    return load_spec(Path(run_dir) / SPEC_FILE)


def _slurm_spec(run_dir: Path):
    return _job_spec(run_dir).slurm


def preflight_node(
    run_dir: Path, spec, hosts: Sequence[str], node_rank: int, master_addr: str, port: int, job_id: str, restart: int
) -> None:
    """Check this node (and, with the others, the network) and log a `preflight` event; a node that fails prints each
    failure with its numbers and exits EXIT_UNHEALTHY without starting DeepSpeed, so the batch script can requeue the
    job without it."""
    from hpcds import preflight

    checks, seconds = preflight.run_preflight(run_dir, spec, hosts, node_rank, master_addr, port)
    failed = [check.name for check in checks if not check.ok]
    runs.append_event(
        run_dir,
        "preflight",
        job_id=job_id,
        restart=restart,
        host=hosts[node_rank],
        ok=not failed,
        failed=failed,
        checks={check.name: check.to_dict() for check in checks},
        seconds=round(seconds, 3),
    )
    if failed:
        print(preflight.render_failures(hosts[node_rank], checks), file=sys.stderr, flush=True)
        raise SystemExit(EXIT_UNHEALTHY)


def check_environment(run_dir: Path, spec, host: str, job_id: str, restart: int) -> None:
    """Compare what this node runs with (hpcds code and version, torch, DeepSpeed, transformers, mamba-ssm,
    causal-conv1d, python) with what submit recorded in meta.json; a change is logged (`environment_changed`) and
    printed, and under slurm.on_version_change: fail ends this node with EXIT_ENVIRONMENT_CHANGED before DeepSpeed
    starts. With slurm.snapshot the code must come from the run's copy."""
    from hpcds import snapshot, versions

    here, copy = versions.package_dir(), snapshot.snapshot_package(run_dir)
    if spec.slurm.snapshot and here.resolve() != copy.resolve():
        raise HpcdsError(
            f"slurm.snapshot: this run's hpcds is the copy in {copy}, but {host} runs hpcds from {here}. "
            f"hint: the batch script puts {copy.parent} first on PYTHONPATH; was the copy removed, or PYTHONPATH "
            "reset in slurm.srun_args or a wrapper?"
        )
    changed = versions.changes(runs.read_meta(run_dir), versions.current_record())
    if not changed:
        return
    action = spec.slurm.on_version_change
    runs.append_event(
        run_dir, "environment_changed", job_id=job_id, restart=restart, host=host, action=action, changed=changed
    )
    what = f"{host} runs other code or versions than the run was submitted with: {versions.render_changes(changed)}"
    if action == "fail":
        print(
            f"hpcds launch: {what}. slurm.on_version_change is fail, so the job ends here without a requeue.\n"
            "  hint: reinstall what the run was submitted with (meta.json: versions, python_executable), or "
            "resubmit the spec as a new run",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(EXIT_ENVIRONMENT_CHANGED)
    print(f"hpcds launch: warning: {what} (slurm.on_version_change: warn, training goes on)", file=sys.stderr)


def _train_env(base: Mapping[str, str], gpu: bool, local: bool = False) -> dict[str, str]:
    env = dict(base)
    if not gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's autodetection guesses, and says so on every rank
    elif local:
        # The GPUs go as `--include localhost:<ids>` in the machine's numbering: the runner must see every device,
        # and its launcher sets CUDA_VISIBLE_DEVICES to the chosen ones for the ranks.
        env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def launch_node(run_dir: Path, env: Mapping[str, str] | None = None) -> None:
    """`hpcds launch`: one node's share of the job; replaces this process with DeepSpeed's launcher."""
    env = dict(os.environ if env is None else env)
    run_dir = Path(run_dir).absolute()
    job_id = env.get("SLURM_JOB_ID")
    nodelist = env.get("SLURM_JOB_NODELIST")
    if not job_id or not nodelist:
        raise HpcdsError("hpcds launch runs inside a Slurm job (SLURM_JOB_ID is unset); use `hpcds run` locally")
    if env.get(NODES_ENV):  # inside a container, from the batch script outside (the image may lack scontrol)
        hosts = env[NODES_ENV].split()
    else:
        from hpcds import slurm

        hosts = slurm.show_hostnames(nodelist)
    expected_nodes = env.get("SLURM_JOB_NUM_NODES")
    if not hosts or (expected_nodes and int(expected_nodes) != len(hosts)):
        raise HpcdsError(f"the hosts of {nodelist} are {hosts}, but SLURM_JOB_NUM_NODES={expected_nodes}")
    node_rank = node_rank_of(hosts, env)
    job_spec = _job_spec(run_dir)
    spec = job_spec.slurm
    gpu = spec.gpus_per_node > 0
    master_addr = env.get(MASTER_ADDR_ENV) or hosts[0]
    restart = int(env.get("SLURM_RESTART_COUNT", "0") or 0)
    if spec.container is None:  # in a container the image pins what runs (and version_mismatch compares hpcds)
        check_environment(run_dir, job_spec, hosts[node_rank], job_id, restart)
    if spec.preflight and env.get(PREFLIGHT_ENV, "1") != "0":
        preflight_node(run_dir, job_spec, hosts, node_rank, master_addr, rendezvous_port(env) + 1, job_id, restart)
    hostfile = run_dir / f"hostfile-{job_id}"
    runs.write_text_atomic(hostfile, render_hostfile(list(hosts), spec.ranks))
    check_hostfile(hostfile, hosts, spec.ranks)
    argv = deepspeed_argv(
        run_dir,
        master_addr=master_addr,
        master_port=rendezvous_port(env),
        hostfile=hostfile,
        node_rank=node_rank,
        deepspeed=_deepspeed_executable(),
    )
    where = {"host": hosts[node_rank], "node_rank": node_rank, "mnt_ns": _mount_namespace()}
    where["hpcds_path"] = str(Path(__file__).absolute().parent)  # a snapshot's copy, or what is installed
    runs.append_event(run_dir, "launch", job_id=job_id, restart=restart, version=__version__, **where, argv=argv)
    outside = env.get(OUTSIDE_VERSION_ENV)
    if outside and outside != __version__:
        runs.append_event(run_dir, "version_mismatch", job_id=job_id, outside=outside, inside=__version__, **where)
        print(
            f"hpcds launch: warning: the batch script was written by hpcds {outside}, but the container runs hpcds "
            f"{__version__}; install the same version in the image (slurm.container.hpcds names the one it runs)",
            file=sys.stderr,
        )
    signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNUMS))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(argv[0], argv, _train_env(env, gpu))
    except OSError as exc:
        raise CommandError(argv, None, str(exc)) from None


def _mount_namespace() -> str | None:
    # Differs from the batch shell's (its `started` event) when the node's launcher runs in a container.
    try:
        return os.readlink("/proc/self/ns/mnt")
    except OSError:
        return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_local(run_dir: Path, ranks: int, devices: Sequence[int] = ()) -> int:
    """`hpcds run`: the same DeepSpeed launcher on this machine with `ranks` processes, one per GPU index in `devices`
    on a GPU spec (`local_devices` chooses them); returns its exit code.

    Ctrl-C reaches every rank through the terminal's process group, and DeepSpeed's launchers start with it blocked
    (as under Slurm); we keep waiting so the trainer can save and exit on its own. A second Ctrl-C kills the launcher
    and the ranks at once.
    """
    run_dir = Path(run_dir).absolute()
    gpu = _slurm_spec(run_dir).gpus_per_node > 0
    argv = deepspeed_argv(
        run_dir,
        master_addr="127.0.0.1",
        master_port=free_port(),
        local_ranks=ranks,
        devices=(devices or range(ranks)) if gpu else (),
        deepspeed=_deepspeed_executable(),
    )
    runs.append_event(run_dir, "launch", job_id=None, restart=0, host=socket.gethostname(), node_rank=0, argv=argv)
    # Ctrl-C and TERM (a `kill`, or a batch system outside Slurm, to the whole process group) are only counted where
    # they arrive, and acted on by the loop below: handled as exceptions, a second one arriving while the first was
    # being handled escaped the loop and left the ranks running.
    asked = [0]

    def count(signum, frame) -> None:
        asked[0] += 1

    previous = {signum: signal.signal(signum, count) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNUMS))
        try:
            process = subprocess.Popen(argv, env=_train_env(os.environ, gpu, local=True))
        except OSError as exc:
            raise CommandError(argv, None, str(exc)) from None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        acted = 0
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                return process.wait(timeout=WAIT_POLL_S)
            if asked[0] > acted:
                acted = asked[0]
                # The first: the ranks got it too when it went to the whole process group (Ctrl-C); a `kill` of this
                # process alone reaches them only through this TERM (the launchers keep it blocked). The second:
                # the launcher and every rank, at once.
                _signal_tree(process.pid, signal.SIGKILL if acted >= 2 else signal.SIGTERM)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _signal_tree(pid: int, signum: int) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
        tree = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for process in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signum)

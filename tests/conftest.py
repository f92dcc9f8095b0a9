"""Shared fixtures. `slurm_cluster`: the project's local Slurm test cluster (scripts/local-slurm up).

Tests that need it are marked `@pytest.mark.slurm` and skip with the reason when the cluster is not up, except when
HPCDS_REQUIRE_SLURM=1 (CI sets it): then a missing cluster fails them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCAL_SLURM = ROOT / "scripts" / "local-slurm"

# hpcds's own cache (DeepSpeed's verdicts on configs) starts empty in every session, for this process and every
# command a test starts: a verdict cached by an earlier run of changed code must not answer for this one.
os.environ["HPCDS_CACHE_DIR"] = tempfile.mkdtemp(prefix="hpcds-test-cache-")


@dataclass(frozen=True)
class SlurmCluster:
    conf: Path
    nodes: list[str]


def _unavailable(reason: str):
    if os.environ.get("HPCDS_REQUIRE_SLURM") == "1":
        pytest.fail(f"HPCDS_REQUIRE_SLURM=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def _conf_path() -> Path | None:
    if os.environ.get("SLURM_CONF"):
        return Path(os.environ["SLURM_CONF"])
    try:
        out = subprocess.run([str(LOCAL_SLURM), "env"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return None
    for line in out.splitlines():
        if line.startswith("export SLURM_CONF="):
            return Path(line.split("=", 1)[1].strip().strip("'\""))
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    """The running cluster (SLURM_CONF exported for the session), or a skip saying how to start it."""
    if shutil.which("sinfo") is None:
        _unavailable("Slurm's client tools are not installed; run `scripts/local-slurm up` as root")
    conf = _conf_path()
    if conf is None or not conf.is_file():
        _unavailable("the local Slurm cluster is not up: run `scripts/local-slurm up` (as root) or set SLURM_CONF")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    try:
        done = subprocess.run(
            ["sinfo", "--noheader", "--format=%n %t"], capture_output=True, text=True, timeout=15, env=env
        )
    except subprocess.TimeoutExpired:
        _unavailable(f"sinfo with SLURM_CONF={conf} did not answer in 15 s; try `scripts/local-slurm status`")
    nodes = sorted({line.split()[0] for line in done.stdout.splitlines() if line.strip()})
    usable = [
        line for line in done.stdout.splitlines() if line.split()[-1].rstrip("*~#!%$@^-") in ("idle", "mix", "alloc")
    ]
    if done.returncode != 0 or not usable:
        _unavailable(f"the Slurm cluster at {conf} has no usable node: {done.stdout.strip() or done.stderr.strip()}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(conf))
        yield SlurmCluster(conf=conf, nodes=nodes)


@pytest.fixture(scope="module")
def submitted(slurm_cluster):
    """Job ids a test module submitted, cancelled when the module is done (cancelling a finished job is a no-op)."""
    job_ids: list[str] = []
    yield job_ids
    for job_id in job_ids:
        subprocess.run(["scancel", job_id], capture_output=True, check=False)

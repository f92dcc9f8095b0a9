"""A rank's host settings (hpcds.train.host): the share of cores per rank, and what the user chose left alone."""

import json
import os
import subprocess
import sys

import pytest

from hpcds.train.host import allocator_left_alone, threads_per_rank


@pytest.mark.parametrize(
    "cores, ranks, torch_threads, env, expected",
    [
        (2, 2, 2, {}, 1),  # two ranks on two cores: one thread each, not two
        (64, 8, 64, {}, 8),
        (3, 2, 3, {}, 1),
        (1, 4, 1, {}, None),  # fewer cores than ranks: one each, which torch chose already
        (16, 1, 8, {}, None),  # never more than torch chose (its count of physical cores)
        (128, 8, 64, {}, 8),  # hyperthreads: the share of the physical cores
        (64, 8, 64, {"OMP_NUM_THREADS": "4"}, None),  # the user's choice stands
    ],
)
def test_each_rank_gets_its_share_of_the_cores(cores, ranks, torch_threads, env, expected):
    assert threads_per_rank(cores, ranks, torch_threads, env) == expected


def test_a_chosen_allocator_is_left_alone():
    assert not allocator_left_alone({})
    assert allocator_left_alone({"MALLOC_TRIM_THRESHOLD_": "0"})
    assert allocator_left_alone({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"})
    assert allocator_left_alone({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"})
    assert not allocator_left_alone({"LD_PRELOAD": "/opt/site/libhook.so", "MALLOC_ARENA_MAX": "2"})


def _apply(env: dict[str, str], local_ranks: int) -> dict:
    code = "import json, torch; from hpcds.train.host import apply_host_settings as apply; "
    code += f"default = torch.get_num_threads(); print(json.dumps({{**apply({local_ranks}), 'default': default}}))"
    chosen = ("OMP_NUM_THREADS", "GLIBC_TUNABLES", "LD_PRELOAD")
    clean = {k: v for k, v in os.environ.items() if k not in chosen and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_settings_as_torch_and_glibc_take_them():
    """Read back from torch in a fresh process: as many ranks as cores get one thread each; glibc takes both
    thresholds; an OMP_NUM_THREADS and a MALLOC_ variable from the user are left as they are."""
    cores = len(os.sched_getaffinity(0))
    shared = _apply({}, local_ranks=cores)
    assert shared["threads"] == 1 and shared["allocator_tuned"] is True
    assert shared["threads_from"] == ("hpcds" if shared["default"] > 1 else "torch")
    chosen = _apply({"OMP_NUM_THREADS": "2", "MALLOC_ARENA_MAX": "2", "MALLOC_TRIM_THRESHOLD_": "0"}, local_ranks=cores)
    assert chosen["threads"] == min(2, cores) and chosen["threads_from"] == "OMP_NUM_THREADS"
    assert chosen["allocator_tuned"] is False

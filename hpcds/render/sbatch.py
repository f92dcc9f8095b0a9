"""The batch scripts: a run's `job.sbatch` and the generic templates in sbatch/ that a person submits with a spec.

Pure functions of a validated `JobSpec` (plus the run directory the script lives in); the templates are jinja2 files in
hpcds/render/templates/, and the facts the shell side shares with Python (exit codes, file names, the warning signal)
come from hpcds.facts. The spec already rejects control characters in every string; the renderer checks again
whatever it puts on an `#SBATCH` line (sbatch has its own parser: whitespace, quotes, `\\` and `#` mean something to
it) and shell-quotes every value that reaches a shell word, so a spec value is either refused here or inert in the
script. Only `slurm.setup` lines are shell code by design and go in verbatim. No I/O here, except `hpcds_command`,
which looks at the running interpreter to name the `hpcds` a batch job should call.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import unicodedata
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcds import __version__
from hpcds.errors import HpcdsError, Problem, SpecError
from hpcds.facts import HF_PREFIX, SECRET_NAME, WARNING_SIGNAL, template_facts

if TYPE_CHECKING:
    import jinja2

    from hpcds.spec import JobSpec

# Environment names the batch script relies on, or that make every later bash run code from a value.
RESERVED_ENV = frozenset(
    {"RUN_DIR", "SLURM_JOB_ID", "SLURM_JOBID", "SLURM_RESTART_COUNT", "SLURM_JOB_NODELIST"}
    | {"BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "IFS", "PS4", "PROMPT_COMMAND"}
)
# Characters with a meaning to sbatch's `#SBATCH` parser (or to the output file pattern, for `%`).
_SBATCH_SPECIAL = re.compile(r"[\s\"'\\#]")


# Compiled templates kept between processes: the command line sets a jinja2 bytecode cache here before the first render
# (hpcds.cli.template_cache); the render layer itself reads and writes no files. None: compiled once per process.
bytecode_cache: Any = None


@cache
def _templates() -> jinja2.Environment:
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("hpcds.render", "templates"),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        bytecode_cache=bytecode_cache,
    )


def hpcds_command(snapshot: bool = False) -> list[str]:
    """How a batch job runs this hpcds without the virtual environment activated: the console script next to the
    running interpreter, else `python -m hpcds` with that interpreter. (Paths are not resolved: a venv's python is a
    symlink whose target would lose the environment.) With `snapshot` always `python -m hpcds`, which imports hpcds
    from the run's copy that the batch script puts first on PYTHONPATH."""
    bin_dir = Path(sys.executable).parent
    script = bin_dir / "hpcds"
    if not snapshot and script.is_file() and os.access(script, os.X_OK):
        return [str(script.absolute())]
    return [str(Path(sys.executable).absolute()), "-m", "hpcds"]


def _command_words(hpcds_cmd: str | Sequence[str]) -> str:
    words = [hpcds_cmd] if isinstance(hpcds_cmd, str) else list(hpcds_cmd)
    if not words or any(not w or _has_control(w) for w in words):
        raise HpcdsError(f"hpcds command {hpcds_cmd!r} is empty or has control characters")
    return shlex.join(words)


def _has_control(text: str) -> bool:
    return any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in text)


def _sbatch_problems(spec: JobSpec) -> list[Problem]:
    """Values that would change how sbatch reads its `#SBATCH` lines. The spec's own patterns keep most of them out;
    this is the last word for what the renderer writes there."""
    slurm = spec.slurm
    problems = []
    candidates = [("name", spec.name)]
    candidates += [
        (f"slurm.{field}", getattr(slurm, field)) for field in ("mem", "time", "partition", "account", "qos")
    ]
    candidates += [(f"slurm.extra_sbatch[{i}]", flag) for i, flag in enumerate(slurm.extra_sbatch)]
    candidates += [(f"slurm.srun_args[{i}]", flag) for i, flag in enumerate(slurm.srun_args)]
    for path, value in candidates:
        if value is not None and (_has_control(value) or _SBATCH_SPECIAL.search(value)):
            problems.append(
                Problem(
                    path,
                    f"{value!r} has whitespace, a quote, a backslash or '#', which sbatch's #SBATCH parser would read "
                    "as syntax",
                    "remove those characters",
                )
            )
    for field in ("time", "mem"):
        value = getattr(slurm, field)
        if value is not None and not value.isascii():
            problems.append(Problem(f"slurm.{field}", f"{value!r} has non-ASCII characters", "Slurm reads digits 0-9"))
    if slurm.constraint is not None and (_has_control(slurm.constraint) or re.search(r"[\"'\\#]", slurm.constraint)):
        problems.append(Problem("slurm.constraint", "has a quote, a backslash or '#'", "remove those characters"))
    for name in slurm.env:
        if name in RESERVED_ENV or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            problems.append(
                Problem(
                    f"slurm.env.{name}",
                    "is used by the batch script itself or changes how every later shell starts",
                    "pick another variable name (or set it in slurm.setup if you really mean it)",
                )
            )
    for i, line in enumerate(slurm.setup):
        if _has_control(line):
            problems.append(Problem(f"slurm.setup[{i}]", "has a control character", "one shell line per list item"))
        if REPLACES_THE_SHELL.search(line):
            problems.append(
                Problem(
                    f"slurm.setup[{i}]",
                    "`exec COMMAND` replaces the batch shell, which then never records how the job ended",
                    "run the command without exec (`exec >file 2>&1`, only redirecting, is fine)",
                )
            )
        for name in SECRET_ASSIGNMENT.findall(line):
            if SECRET_NAME.search(name) and not name.upper().endswith(NAMES_OF_PLACES):
                problems.append(
                    Problem(
                        f"slurm.setup[{i}]",
                        f"writes the value of {name}, which looks like a secret, into job.sbatch",
                        f"export it in the shell you submit from (sbatch passes it on), or read it from a file only "
                        f"you can read: export {name}=$(cat ~/.secrets/{name})",
                    )
                )
    return problems


# `exec` with a command (not only redirections) at a line's start or after `;`, `&&`, `||`: the batch shell runs
# setup lines itself, and would be replaced.
REPLACES_THE_SHELL = re.compile(r"(?:^|[;&|]\s*)exec\s+(?![0-9]*[<>&])\S")
# Secret-looking names that hold where a secret is, not the secret (HF_TOKEN_PATH, AWS_SHARED_CREDENTIALS_FILE).
NAMES_OF_PLACES = ("_PATH", "_FILE", "_DIR")
# `NAME=value` with a literal value (not `$...` or `"$..."`) wherever a word starts: `export A=1 B=2`, `X=y cmd`.
SECRET_ASSIGNMENT = re.compile(r"""(?:^|[\s;&|])([A-Za-z_][A-Za-z0-9_]*)=(?!["']?\$)\S""")


def check_run_dir(run_dir: str) -> str:
    """The run directory goes literally into `#SBATCH --output=`: sbatch splits on whitespace, reads quotes, `\\`
    and `#`, and expands `%` patterns there, so such paths are refused rather than half-working."""
    text = str(run_dir)
    if not os.path.isabs(text):
        raise HpcdsError(f"run directory {text!r} must be an absolute path (the job starts in another directory)")
    if _has_control(text) or _SBATCH_SPECIAL.search(text) or "%" in text:
        raise HpcdsError(
            f"run directory {text!r} has whitespace, a quote, '\\', '#', '%' or a control character, which an "
            "#SBATCH line cannot hold; choose a runs folder without them (--runs-dir or HPCDS_RUNS_DIR)"
        )
    return text


def _sbatch_word(value: str) -> str:
    # A constraint such as "a100 & ib" holds spaces: sbatch groups a double-quoted argument.
    return f'"{value}"' if re.search(r"\s", value) else value


def container_binds(spec: JobSpec, run_dir: str) -> list[str]:
    """What the container must see as outside: the run directory and the spec's folders (data, model, tokenizer,
    checkpoints, NVMe) at the same paths, then the spec's own mounts. A folder inside another one that is bound at its
    own path (the spec's `/lustre:/lustre` included) is left out."""
    data = spec.data
    mounts = list(spec.slurm.container.mounts)
    same_path = [src for src, dst, *_ in ([*m.split(":"), ""] for m in mounts) if dst in ("", src)]
    paths = [run_dir, *(d.path for d in [*data.train, *data.val]), spec.model.path, spec.checkpoint.dir]
    paths += [data.tokenizer.removeprefix(HF_PREFIX), spec.deepspeed.nvme_path]
    folders: list[str] = []
    for path in (p.rstrip("/") for p in paths if p and p.startswith("/")):
        if not any(path == f or path.startswith(f.rstrip("/") + "/") for f in [*folders, *same_path]):
            folders = [f for f in folders if not f.startswith(path + "/")] + [path]
    return [f"{folder}:{folder}" for folder in folders] + mounts


def container_words(spec: JobSpec, run_dir: str) -> list[str]:
    """The words on the srun line between srun's options and `hpcds launch`: the container, if any."""
    container = spec.slurm.container
    if container is None:
        return []
    if container.kind == "pyxis":  # srun itself starts the task inside: no process of its own to keep alive
        words = [
            f"--container-image={container.image}",
            "--container-mounts=" + ",".join(container_binds(spec, run_dir)),
        ]
        if container.workdir:
            words.append(f"--container-workdir={container.workdir}")
        return words + list(container.args)
    if container.kind == "apptainer":
        gpu = ["--nv"] if spec.slurm.gpus_per_node else []
        runner = ["apptainer", "exec", *gpu, "--bind", ",".join(container_binds(spec, run_dir)), *container.args]
        runner.append(container.image)
    else:
        runner = list(container.wrapper)
    # Slurm sends its warning and TERM to every process of the step, the wrapper too, which would die of them and take
    # the ranks along. Ignored signals stay ignored across exec; `hpcds launch` inside blocks them as usual.
    keep_alive = f'trap "" {WARNING_SIGNAL} TERM INT; exec "$@"'
    return ["bash", "-c", keep_alive, "hpcds-container", *runner]


def _master_interface(slurm) -> str | None:
    """With `master_addr: ip`, the interface whose address the first node publishes: GLOO_SOCKET_IFNAME when it names
    one interface (gloo's own choice), else "" (the first address of `hostname -I`). None with `master_addr: hostname`.
    """
    if slurm.master_addr != "ip":
        return None
    named = slurm.env.get("GLOO_SOCKET_IFNAME", "")
    return named if re.fullmatch(r"[A-Za-z0-9_.:-]+", named) else ""


def render_sbatch(
    spec: JobSpec,
    run_dir: str,
    hpcds_cmd: str | Sequence[str] = "hpcds",
    *,
    array_tasks: Sequence[str] = (),
    max_parallel: int | None = None,
) -> str:
    """The batch script of the run whose directory is `run_dir` (absolute; the output file goes there too).

    `hpcds_cmd` is the hpcds the job runs; the default keeps generated text machine-independent (tests, templates),
    and the code that creates a run directory passes `hpcds_command()`.

    With `array_tasks` (run directories, one per task) the script is a sweep's job array, `--array=0-N[%max_parallel]`,
    and `run_dir` the sweep folder: task i runs in `array_tasks[i]`, its output reaches it through `run_dir/t<i>`
    (a link the caller makes), and scontrol acts on `<array job>_<task>`.
    """
    problems = _sbatch_problems(spec)
    if problems:
        raise SpecError(problems)
    run_dir = check_run_dir(run_dir)
    tasks = [check_run_dir(task_dir) for task_dir in array_tasks]
    array = f"0-{len(tasks) - 1}" + (f"%{int(max_parallel)}" if max_parallel else "") if tasks else ""
    # The container sees the runs folder, which holds every task's run directory beside the sweep folder.
    bound_dir = os.path.dirname(run_dir.rstrip("/")) if tasks else run_dir
    slurm = spec.slurm
    resources = []
    if slurm.cpus_per_task is not None:
        resources.append(f"--cpus-per-task={slurm.cpus_per_task}")
    if slurm.mem is not None:
        resources.append(f"--mem={slurm.mem}")
    resources.append(f"--time={slurm.time}")
    for field in ("partition", "account", "qos"):
        value = getattr(slurm, field)
        if value is not None:
            resources.append(f"--{field}={value}")
    if slurm.constraint is not None:
        resources.append(f"--constraint={_sbatch_word(slurm.constraint)}")
    return (
        _templates()
        .get_template("job.sbatch.j2")
        .render(
            **template_facts(),
            version=__version__,
            run_name=os.path.basename(run_dir.rstrip("/")),
            array=array,
            array_tasks=[(index, shlex.quote(task_dir)) for index, task_dir in enumerate(tasks)],
            job_ref="$array_task" if tasks else "$SLURM_JOB_ID",
            job_name=spec.name,
            nodes=slurm.nodes,
            gpus_per_node=slurm.gpus_per_node,
            resource_flags=resources,
            # Slurm 22.05-23.02 srun ignores SLURM_CPUS_PER_TASK: without this the launcher, every rank and DeepSpeed's
            # CPU Adam share one core under a binding TaskPlugin (task/affinity, task/cgroup).
            srun_cpus=f" --cpus-per-task={slurm.cpus_per_task}" if slurm.cpus_per_task is not None else "",
            step_words="".join(f" {shlex.quote(arg)}" for arg in [*slurm.srun_args, *container_words(spec, bound_dir)]),
            container=slurm.container is not None,
            snapshot=slurm.snapshot,
            master_interface=_master_interface(slurm),
            gpu_request=slurm.gpu_request,
            signal_lead_s=slurm.signal_lead_s,
            output_path=f"{run_dir.rstrip('/') or '/'}/{'t%a/' if tasks else ''}slurm-%j.out",
            extra_sbatch=list(slurm.extra_sbatch),
            run_dir_q=shlex.quote(run_dir),
            setup=list(slurm.setup),
            env=[(name, shlex.quote(value), "$" in value or "`" in value) for name, value in slurm.env.items()],
            hpcds_cmd=_command_words(slurm.container.hpcds if slurm.container and slurm.container.hpcds else hpcds_cmd),
            max_requeues=slurm.max_requeues,
            max_failure_requeues=slurm.max_failure_requeues,
            max_no_progress=slurm.max_no_progress,
            exclude_bad_nodes=slurm.exclude_bad_nodes,
            hang_limit_s=slurm.hang_limit_s,
        )
    )


def render_submit_template(
    template_path: str = "sbatch/deepspeed.sbatch",
    nodes: int = 1,
    signal_lead_s: int = 300,
    hpcds_cmd: str | Sequence[str] = "hpcds",
) -> str:
    """The generic script a person submits with plain sbatch and a spec path (the files in sbatch/)."""
    return (
        _templates()
        .get_template("submit.sbatch.j2")
        .render(
            **template_facts(),
            version=__version__,
            template_path=template_path,
            nodes=int(nodes),
            signal_lead_s=int(signal_lead_s),
            hpcds_cmd=_command_words(hpcds_cmd),
        )
    )


# The files in sbatch/, each generated by `render_submit_template` with these arguments (a test keeps them equal).
SUBMIT_TEMPLATES: dict[str, dict[str, Any]] = {
    "deepspeed.sbatch": {"nodes": 1},
    "deepspeed-multinode.sbatch": {"nodes": 2},
}


def render_submit_templates() -> dict[str, str]:
    return {
        name: render_submit_template(template_path=f"sbatch/{name}", **kwargs)
        for name, kwargs in SUBMIT_TEMPLATES.items()
    }

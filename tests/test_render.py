"""The renderer: golden batch scripts and DeepSpeed configs, the sbatch/ templates, DeepSpeed's own parsers, the CLI.

Golden files live in tests/golden/. After an intended change, rerun with HPCDS_ACCEPT=1: it rewrites the golden files
and the templates in sbatch/, and `git diff` shows what changed.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpcds.cli.render_cmd import prepare, render
from hpcds.errors import HpcdsError, SpecError
from hpcds.plan import pin_strategy
from hpcds.render import (
    SUBMIT_TEMPLATES,
    check_run_dir,
    render_ds_config,
    render_ds_config_json,
    render_hostfile,
    render_run_files,
    render_sbatch,
    render_submit_templates,
)
from hpcds.render.sbatch import container_binds
from hpcds.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
ACCEPT = os.environ.get("HPCDS_ACCEPT") == "1"
RUN_DIR = "/scratch/runs/{name}-20260101-000000"

# name -> (preset or spec file, --set assignments, CLI flags)
CASES = {
    "quickstart": ("quickstart", [], {}),
    "7b_mamba-2nodes": ("7b_mamba", ["deepspeed.zero_stage=3", "slurm.gpus_per_node=8"], {"nodes": 2}),
    "gpt2-xl-site": (
        "gpt2-xl",
        [
            "training.precision=fp16",
            "deepspeed.zero_stage=3",
            "deepspeed.offload_optimizer=nvme",
            "deepspeed.offload_params=cpu",
            "deepspeed.nvme_path=/local_nvme/ds",
            "deepspeed.config={zero_optimization: {sub_group_size: 100000000}, communication_data_type: fp32}",
            "slurm.account=lab-ml",
            "slurm.qos=high",
            "slurm.constraint=a100&ib",
            "slurm.cpus_per_task=32",
            "slurm.mem=256G",
            "slurm.setup=['module load cuda/12.4', 'source ~/envs/train/bin/activate']",
            'slurm.env={NCCL_DEBUG: WARN, NCCL_SOCKET_IFNAME: "ib0,^docker", NOTE: "it\'s $HOME; `not run`"}',
            "slurm.extra_sbatch=[--exclusive, --reservation=llm]",
        ],
        {"nodes": 4, "gpus_per_node": 4, "partition": "gpu", "time": "2-00:00:00"},
    ),
    # Containers whose runtimes are not installed here: the rendering of their documented syntax, checked by
    # bash -n and shellcheck (docs/containers.md says what was and was not run).
    "container-pyxis": (
        "7b_mamba",
        [
            "deepspeed.zero_stage=3",
            "slurm.container={kind: pyxis, image: 'nvcr.io#nvidia/pytorch:24.05-py3', mounts: [/lustre:/lustre], "
            "workdir: /workspace, args: [--container-env=NCCL_DEBUG, --no-container-mount-home]}",
            "data.train=[/lustre/data/fineweb]",
            "slurm.gpu_request=gres",
            "slurm.srun_args=[--cpu-bind=none, --wait=60]",
        ],
        {"nodes": 2, "gpus_per_node": 8},
    ),
    "container-apptainer": (
        "gpt2-xl",
        [
            "slurm.container={kind: apptainer, image: /images/train.sif, mounts: ['/scratch/hf:/root/.cache/hf:ro'], "
            "args: [--writable-tmpfs], hpcds: [python3, -m, hpcds]}",
            "model.max_seq_len=1024",
        ],
        {"nodes": 2, "gpus_per_node": 4},
    ),
}


def case_spec(name: str):
    preset, sets, flags = CASES[name]
    return load_spec(None, sets, flags, preset=preset)


def check_golden(path: Path, text: str) -> None:
    if ACCEPT:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing: run HPCDS_ACCEPT=1 pytest {__file__} to create it"
    if path.read_text() != text:
        pytest.fail(
            f"{path.relative_to(ROOT)} differs from what the renderer produces now. If the change is intended, "
            f"rerun with HPCDS_ACCEPT=1 to rewrite it and review `git diff`."
        )


def shell_checks(path: Path) -> None:
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, f"bash -n {path.name}: {result.stderr}"
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian/Ubuntu: apt-get install shellcheck)")
    result = subprocess.run(["shellcheck", "-s", "bash", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, f"shellcheck {path.name}:\n{result.stdout}"


# ---------------------------------------------------------------------------------------------------------------------
# Golden files and shell checks


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_sbatch(name, tmp_path):
    text = render_sbatch(case_spec(name), RUN_DIR.format(name=name))
    check_golden(GOLDEN / f"{name}.sbatch", text)
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    shell_checks(script)


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_ds_config(name):
    check_golden(GOLDEN / f"{name}.json", render_ds_config_json(pin_strategy(case_spec(name))))


def test_golden_script_has_every_resource_and_the_contract_lines():
    text = render_sbatch(case_spec("gpt2-xl-site"), "/scratch/runs/g")
    sbatch_lines = [line.split("#", 2)[1].strip() for line in text.splitlines() if line.startswith("#SBATCH")]
    for expected in [
        "SBATCH --job-name=gpt2-xl",
        "SBATCH --nodes=4",
        "SBATCH --ntasks-per-node=1",
        "SBATCH --gpus-per-node=4",
        "SBATCH --cpus-per-task=32",
        "SBATCH --mem=256G",
        "SBATCH --time=2-00:00:00",
        "SBATCH --partition=gpu",
        "SBATCH --account=lab-ml",
        "SBATCH --qos=high",
        "SBATCH --constraint=a100&ib",
        "SBATCH --requeue",
        "SBATCH --open-mode=append",
        "SBATCH --signal=USR2@300",
        "SBATCH --output=/scratch/runs/g/slurm-%j.out",
        "SBATCH --exclusive",
        "SBATCH --reservation=llm",
    ]:
        assert expected in sbatch_lines, expected
    # sbatch stops reading options at the first command: every #SBATCH line comes before it.
    lines = text.splitlines()
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert max(i for i, line in enumerate(lines) if line.startswith("#SBATCH")) < first_command
    # the step gets the CPUs the job asked for (Slurm 22.05-23.02 srun does not inherit them)
    assert 'srun --ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task=32 hpcds launch "$RUN_DIR"' in text
    assert "export NOTE='it'\"'\"'s $HOME; `not run`'" in text  # literal, never expanded
    assert "module load cuda/12.4\nsource ~/envs/train/bin/activate\n" in text  # setup lines verbatim


def test_cpu_spec_has_no_gpu_line_and_quotes_spaced_constraints():
    spec = load_spec(None, ["slurm.constraint=a100 & ib"], preset="quickstart")
    text = render_sbatch(spec, "/r/q")
    assert "--gpus-per-node" not in text
    assert '#SBATCH --constraint="a100 & ib"' in text


def test_submit_templates_in_sbatch_dir_are_the_renderers_output(tmp_path):
    rendered = render_submit_templates()
    on_disk = sorted(p.name for p in (ROOT / "sbatch").glob("*.sbatch"))
    for name, text in rendered.items():
        check_golden(ROOT / "sbatch" / name, text)
        script = tmp_path / name
        script.write_text(text)
        shell_checks(script)
    if not ACCEPT:
        assert on_disk == sorted(SUBMIT_TEMPLATES), "sbatch/ holds templates the renderer does not produce"


# ---------------------------------------------------------------------------------------------------------------------
# DeepSpeed's own parsers


@pytest.fixture(scope="module")
def deepspeed_config_class():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    return DeepSpeedConfig


@pytest.mark.deepspeed
@pytest.mark.parametrize("name", sorted(CASES))
def test_deepspeed_parses_the_config(name, deepspeed_config_class, monkeypatch):
    import deepspeed.comm

    spec = pin_strategy(case_spec(name))
    config = json.loads(render_ds_config_json(spec))
    # DeepSpeedConfig reads the world size from the process group; hand it the run's instead of starting
    # spec.world_size processes (its batch check is micro * accumulation * world size == train_batch_size).
    monkeypatch.setattr(deepspeed.comm, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(deepspeed.comm, "get_world_size", lambda group=None: spec.world_size)
    parsed = deepspeed_config_class(config)
    assert parsed.world_size == spec.world_size
    assert parsed.train_batch_size == spec.global_batch_size
    assert parsed.train_micro_batch_size_per_gpu == spec.training.micro_batch_size
    assert parsed.gradient_accumulation_steps == spec.training.grad_accum_steps
    assert parsed.gradient_clipping == spec.training.grad_clip
    assert parsed.zero_optimization_stage == spec.deepspeed.zero_stage
    assert parsed.bfloat16_config.enabled == (spec.training.precision == "bf16")
    assert parsed.float16_config.enabled == (spec.training.precision == "fp16")
    if spec.training.precision == "fp16":
        assert parsed.float16_config.loss_scale == 0  # dynamic
    zero = parsed.zero_config
    if spec.deepspeed.offload_optimizer != "none":
        assert zero.offload_optimizer.device == spec.deepspeed.offload_optimizer
    if spec.deepspeed.offload_params != "none":
        assert zero.offload_param.device == spec.deepspeed.offload_params
    if spec.deepspeed.zero_stage == 3:
        assert zero.gather_16bit_weights_on_model_save
    assert parsed.optimizer_name is None and parsed.scheduler_name is None


@pytest.mark.deepspeed
def test_deepspeed_parses_a_single_rank_config_unpatched(deepspeed_config_class):
    # Without a process group DeepSpeedConfig counts one rank: a one-rank spec needs no stand-in world size.
    spec = load_spec(None, ["slurm.ranks_per_node=1", "training.grad_accum_steps=4"], preset="quickstart")
    parsed = deepspeed_config_class(render_ds_config(spec))
    assert (parsed.world_size, parsed.train_batch_size) == (1, spec.training.micro_batch_size * 4)
    assert parsed.zero_optimization_stage == 2 and not parsed.bfloat16_config.enabled


def test_deepspeed_parses_the_hostfile():
    from deepspeed.launcher.runner import _parse_hostfile

    hosts = ["gpu-a001", "gpu-a002", "node10.cluster.example", "n[1]"]
    text = render_hostfile(hosts, 8)
    assert text == "gpu-a001 slots=8\ngpu-a002 slots=8\nnode10.cluster.example slots=8\nn[1] slots=8\n"
    assert _parse_hostfile(text.splitlines()) == dict.fromkeys(hosts, 8)
    assert list(_parse_hostfile(text.splitlines())) == hosts  # order = node rank


@pytest.mark.parametrize(
    ("hosts", "slots"),
    [([], 4), (["a", "a"], 4), (["a b"], 4), (["a\n"], 4), ([""], 4), (["#a"], 4), (["a"], 0), ("ab", 4)],
)
def test_hostfile_refuses_what_deepspeed_would_misread(hosts, slots):
    with pytest.raises(HpcdsError):
        render_hostfile(hosts, slots)


def test_hostfile_for_1024_nodes():
    hosts = [f"node{i:04d}" for i in range(1024)]
    lines = render_hostfile(hosts, 8).splitlines()
    assert len(lines) == 1024 and lines[-1] == "node1023 slots=8"


# ---------------------------------------------------------------------------------------------------------------------
# DeepSpeed config details


def test_ds_config_needs_a_pinned_stage():
    spec = load_spec(None, ["deepspeed.zero_stage=auto"], preset="1b_mamba")
    with pytest.raises(HpcdsError, match="pin"):
        render_ds_config(spec)


def test_raw_config_is_merged_last_and_deep():
    spec = load_spec(
        None,
        ["deepspeed.config={zero_optimization: {reduce_bucket_size: 1234}, gradient_clipping: 0.5, x: {y: 1}}"],
        preset="quickstart",
    )
    config = render_ds_config(spec)
    assert config["zero_optimization"]["reduce_bucket_size"] == 1234
    assert config["zero_optimization"]["stage"] == 2  # kept: the merge is key by key
    assert config["gradient_clipping"] == 0.5 and config["x"] == {"y": 1}


def test_train_batch_size_is_micro_times_accum_times_world():
    spec = load_spec(
        None,
        ["training.micro_batch_size=3", "training.grad_accum_steps=5"],
        {"nodes": 4, "gpus_per_node": 8},
        "1b_mamba",
    )
    spec = pin_strategy(spec)
    assert render_ds_config(spec)["train_batch_size"] == 3 * 5 * 32


def test_offload_optimizer_allows_the_client_optimizer():
    spec = load_spec(None, ["deepspeed.zero_stage=2", "deepspeed.offload_optimizer=cpu"], preset="1b_mamba")
    config = render_ds_config(spec)
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert config["zero_force_ds_cpu_optimizer"] is False


def test_render_run_files_pins_the_strategy(tmp_path):
    spec = load_spec(None, ["deepspeed.zero_stage=auto"], {"gpus_per_node": 8}, preset="1b_mamba")
    pinned, files = render_run_files(spec)
    assert isinstance(pinned.deepspeed.zero_stage, int)
    assert set(files) == {"spec.yaml", "ds_config.json"}
    assert json.loads(files["ds_config.json"])["zero_optimization"]["stage"] == pinned.deepspeed.zero_stage
    (tmp_path / "spec.yaml").write_text(files["spec.yaml"])
    assert load_spec(tmp_path / "spec.yaml") == pinned  # the resolved spec reads back as itself


# ---------------------------------------------------------------------------------------------------------------------
# What the renderer refuses


@pytest.mark.parametrize(
    "run_dir", ["relative/run", "/runs/a b", "/runs/a%j", "/runs/a#b", '/runs/a"b', "/runs/a'b", "/runs/a\\b", "/r/\n"]
)
def test_run_dir_that_an_sbatch_line_cannot_hold_is_refused(run_dir):
    with pytest.raises(HpcdsError, match="run directory"):
        check_run_dir(run_dir)
    with pytest.raises(HpcdsError):
        render_sbatch(load_spec(None, preset="quickstart"), run_dir)


@pytest.mark.parametrize(
    ("assignment", "path"),
    [
        ("slurm.extra_sbatch=['--comment=a#b']", "slurm.extra_sbatch[0]"),
        ("slurm.extra_sbatch=['--comment=\"x']", "slurm.extra_sbatch[0]"),
        ("slurm.extra_sbatch=['--comment=a\\b']", "slurm.extra_sbatch[0]"),
        ("slurm.env={RUN_DIR: /tmp}", "slurm.env.RUN_DIR"),
        ("slurm.env={BASH_ENV: /tmp/x}", "slurm.env.BASH_ENV"),
    ],
)
def test_values_sbatch_or_the_script_would_misread_are_refused_with_their_path(assignment, path):
    spec = load_spec(None, [assignment], preset="quickstart")
    with pytest.raises(SpecError) as info:
        render_sbatch(spec, "/r/x")
    assert [p.path for p in info.value.problems] == [path]


# The flags hpcds writes itself, as public training scripts also write them; each would silently override the plan,
# the requeue path or where `hpcds logs` reads.
OWNED = {
    "extra_sbatch": [
        *("--output=logs/%x-%j.out", "--error=logs/%x-%j.err", "--no-requeue", "--signal=B:USR1@90", "--nodes=4"),
        *("--time=20:00:00", "--job-name=tr11-176B", "--ntasks-per-node=8", "--open-mode=truncate"),
        *("--gpus-per-node=8", "--gres=gpu:8", "--cpus-per-task=64", "--partition=gpu_p5", "--array=0-3"),
        *("--out=x.log", "--tasks-per-node=8"),  # an abbreviation sbatch takes for --output; --ntasks-per-node's alias
    ],
    "srun_args": ["--kill-on-bad-exit=0", "--ntasks-per-node=8", "--export=NONE", "--nodes=2", "--nodelist=n1"],
}
SITE_FLAGS = {
    "extra_sbatch": [
        *("--exclusive", "--reservation=hackathon", "--hint=nomultithread", "--exclude=n[3-4]", "--gres=nvme:1"),
        "--mail-type=END",
    ],
    "srun_args": ["--cpu-bind=cores", "--wait=60", "--label", "--unbuffered", "--mpi=pmix"],
}


def test_flags_hpcds_owns_are_refused_with_the_field_that_sets_them():
    sets = [f"slurm.{field}={json.dumps(flags)}" for field, flags in OWNED.items()]
    with pytest.raises(SpecError) as info:
        load_spec(None, sets, preset="quickstart")
    found = {(p.path, p.message.split()[0]) for p in info.value.problems}
    assert found == {(f"slurm.{field}[{i}]", flag) for field, flags in OWNED.items() for i, flag in enumerate(flags)}
    hints = {p.path: p.hint for p in info.value.problems}
    assert "slurm.nodes" in hints["slurm.extra_sbatch[4]"] and "max_requeues" in hints["slurm.extra_sbatch[2]"]
    assert "gpu_request: gres" in hints["slurm.extra_sbatch[10]"] and "hpcds logs" in hints["slurm.extra_sbatch[0]"]


@pytest.mark.parametrize(
    ("container", "paths"),
    [
        ("{kind: pyxis}", ["slurm.container.image"]),
        ("{kind: wrapper, image: x.sif}", ["slurm.container.image", "slurm.container.wrapper"]),
        (
            "{kind: apptainer, image: x.sif, workdir: /w, args: [--cleanenv]}",
            ["slurm.container.workdir", "slurm.container.args[0]"],
        ),
        ("{kind: pyxis, image: x, args: [--container-mounts=/a:/a]}", ["slurm.container.args[0]"]),
        (
            "{kind: pyxis, image: x, mounts: ['a:/a', '/b,/c']}",
            ["slurm.container.mounts[0]", "slurm.container.mounts[1]"],
        ),
    ],
)
def test_container_settings_that_cannot_work_are_refused_with_their_path(container, paths):
    with pytest.raises(SpecError) as info:
        load_spec(None, [f"slurm.container={container}"], preset="quickstart")
    assert sorted(p.path for p in info.value.problems) == sorted(paths)


def test_container_binds_the_runs_folders_at_their_own_paths():
    sets = ["slurm.container={kind: apptainer, image: /i.sif, mounts: ['/lustre:/lustre', '/s:/cache:ro']}"]
    sets += ["data.train=[/lustre/d, /data/a, /data/a/b]", "model.path=/models/m", "checkpoint.dir=/ckpt/r"]
    sets += ["data.tokenizer=hf:/models/m/tok", "deepspeed.zero_stage=3", "deepspeed.offload_optimizer=nvme"]
    spec = load_spec(None, [*sets, "deepspeed.nvme_path=/local_nvme"], preset="quickstart")
    binds = container_binds(spec, "/runs/r1")
    assert binds == [f"{p}:{p}" for p in ("/runs/r1", "/data/a", "/models/m", "/ckpt/r", "/local_nvme")] + [
        "/lustre:/lustre",
        "/s:/cache:ro",
    ]


def test_master_addr_ip_takes_gloos_interface_when_the_spec_names_one():
    def lines(*sets):
        script = render_sbatch(load_spec(None, list(sets), preset="quickstart"), "/r/x")
        return [line for line in script.splitlines() if line.startswith("HPCDS_MASTER_ADDR=")]

    assert lines() == []  # by host name: DeepSpeed gets the first node's name from the node list
    assert lines("slurm.master_addr=ip") == ["HPCDS_MASTER_ADDR=$(hostname -I | awk '{ print $1 }')"]
    named = lines("slurm.master_addr=ip", "slurm.env={GLOO_SOCKET_IFNAME: ib0}")
    assert named == ['HPCDS_MASTER_ADDR=$(ip -4 -o addr show dev ib0 | awk \'{ sub("/.*", "", $4); print $4; exit }\')']
    # gloo's exclusion syntax names no single interface: back to the first address.
    assert lines("slurm.master_addr=ip", "slurm.env={GLOO_SOCKET_IFNAME: '^docker0,lo'}") == lines(
        "slurm.master_addr=ip"
    )


def test_site_flags_reach_sbatch_and_srun_and_gres_asks_for_the_gpus():
    sets = [f"slurm.{field}={json.dumps(flags)}" for field, flags in SITE_FLAGS.items()]
    spec = load_spec(None, [*sets, "slurm.gpu_request=gres"], {"gpus_per_node": 4}, preset="quickstart")
    lines = render_sbatch(spec, "/r/x").splitlines()
    for flag in SITE_FLAGS["extra_sbatch"]:
        assert f"#SBATCH {flag}" in lines
    assert "#SBATCH --gres=gpu:4" in lines and not [line for line in lines if "--gpus-per-node" in line]
    (srun,) = [line for line in lines if line.startswith("srun ")]
    assert shlex.split(srun) == [
        "srun",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        *SITE_FLAGS["srun_args"],
        "hpcds",
        "launch",
        "$RUN_DIR",
    ]


@pytest.mark.parametrize(("field", "value"), [("time", "\u0663\u0660:00:00"), ("mem", "\u0666\u0664G")])
def test_non_ascii_digits_are_refused_by_the_renderer_too(field, value):
    # The spec refuses them (its patterns say [0-9]); the renderer is the last word for #SBATCH lines all the same,
    # so check it on a copy that skipped validation.
    spec = load_spec(None, preset="quickstart")
    spec = spec.model_copy(update={"slurm": spec.slurm.model_copy(update={field: value})})
    with pytest.raises(SpecError) as info:
        render_sbatch(spec, "/r/x")
    assert [p.path for p in info.value.problems] == [f"slurm.{field}"]


# ---------------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_render_mamba7b_two_nodes(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "hpcds", "render", "configs/mamba7b.yaml", "--nodes", "2", "--runs-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --nodes=2\n" in result.stdout
    assert f"RUN_DIR={tmp_path}/mamba7b-" in result.stdout
    script = tmp_path / "job.sbatch"
    script.write_text(result.stdout)
    shell_checks(script)


def test_cli_rejects_an_injected_name(tmp_path):
    sentinel = tmp_path / "p"
    spec = tmp_path / "bad.yaml"
    spec.write_text(f'name: "x$(touch {sentinel})"\npreset: quickstart\n')
    result = subprocess.run(
        [sys.executable, "-m", "hpcds", "render", str(spec)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "name:" in result.stderr and "is not a valid name" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert not sentinel.exists()


def test_cli_render_ds_config_pins_auto(tmp_path):
    result = CliRunner().invoke(render, ["--preset", "1b_mamba", "--gpus-per-node", "8", "--ds-config"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["zero_optimization"]["stage"] in (0, 1, 2, 3)


def test_cli_render_with_run_dir_is_the_library_output():
    from hpcds.render import hpcds_command

    result = CliRunner().invoke(render, ["--preset", "quickstart", "--run-dir", "/scratch/runs/q"])
    assert result.exit_code == 0, result.output
    assert result.output == render_sbatch(load_spec(None, preset="quickstart"), "/scratch/runs/q", hpcds_command())
    assert Path(hpcds_command()[0]).is_absolute()


def test_prepare_creates_once_per_job_id(tmp_path):
    runner = CliRunner()
    args = ["--preset", "quickstart", "--runs-dir", str(tmp_path), "--job-id", "42"]
    first = runner.invoke(prepare, args)
    assert first.exit_code == 0, first.output
    run_dir = Path(first.output.strip())
    assert run_dir.parent == tmp_path.absolute()
    for name in ("spec.yaml", "ds_config.json", "job.sbatch", "meta.json", "events.jsonl"):
        assert (run_dir / name).is_file(), name
    script = (run_dir / "job.sbatch").read_text()
    assert f"#SBATCH --output={run_dir}/slurm-%j.out" in script
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["job_ids"] == ["42"] and len(meta["wandb_id"]) == 8
    (run_dir / "marker").write_text("kept")

    again = runner.invoke(prepare, [*args[:-1], "42", "--nodes", "3"])  # requeued: same id, same directory
    assert again.exit_code == 0, again.output
    assert Path(again.output.strip()) == run_dir
    assert (run_dir / "job.sbatch").read_text() == script and (run_dir / "marker").is_file()

    # The spec is not read again for a known job id: a requeued job survives an edited or removed spec file.
    gone = runner.invoke(prepare, [str(tmp_path / "removed.yaml"), "--runs-dir", str(tmp_path), "--job-id", "42"])
    assert gone.exit_code == 0 and Path(gone.output.strip()) == run_dir

    other = runner.invoke(prepare, [*args[:-1], "43"])
    assert other.exit_code == 0 and Path(other.output.strip()) != run_dir
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 2


def test_prepare_refuses_a_runs_dir_sbatch_cannot_name(tmp_path):
    result = CliRunner().invoke(prepare, ["--preset", "quickstart", "--runs-dir", str(tmp_path / "a b")])
    assert result.exit_code != 0
    assert isinstance(result.exception, HpcdsError) and "run directory" in str(result.exception)
    assert not (tmp_path / "a b").exists() or not any((tmp_path / "a b").iterdir())


def test_checked_in_hostfiles_parse_with_deepspeed():
    from deepspeed.launcher.runner import _parse_hostfile

    from hpcds.render import parse_hostfile

    files = sorted((ROOT / "hostfiles").glob("*.hostfile"))
    assert files, "hostfiles/ should hold an example"
    for path in files:
        lines = path.read_text().splitlines()
        assert dict(_parse_hostfile(lines)) == parse_hostfile(path.read_text())


# ---------------------------------------------------------------------------------------------------------------------
# The real thing: the rendered script under the project's local two-node Slurm cluster

FAKE_LAUNCH = """#!/bin/bash
# Stands in for `hpcds launch RUN_DIR` on each node: logs what it got, asks for a requeue on the first run the way the
# trainer does (its rank 0 logs `stopped` before any rank exits 75).
restart=${SLURM_RESTART_COUNT:-0}
printf '%s restart=%s argv=%s probe=%s\\n' "$(hostname)" "$restart" "$*" "$HPCDS_PROBE" >>"$2/launch.log"
if [ "$restart" = 0 ]; then
  [ "$SLURM_NODEID" = 0 ] && printf '{"time": 0, "event": "stopped", "step": 1}\\n' >>"$2/events.jsonl"
  sleep 1
  exit 75
fi
exit 0
"""


@pytest.mark.slurm
def test_real_slurm_runs_the_script_and_requeues_on_75(slurm_cluster, tmp_path):
    import time

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "events.jsonl").touch()
    fake = tmp_path / "fake-hpcds"
    fake.write_text(FAKE_LAUNCH)
    fake.chmod(0o755)
    spec = load_spec(
        None,
        [
            "slurm.setup=['echo setup-ran on $(hostname)']",
            'slurm.env={HPCDS_PROBE: "a b $HOME `x`"}',
            "slurm.max_requeues=1",
        ],
        {"nodes": len(slurm_cluster.nodes), "gpus_per_node": 0, "time": "00:05:00"},
        preset="quickstart",
    )
    script = run_dir / "job.sbatch"
    script.write_text(render_sbatch(spec, str(run_dir), [str(fake)]))
    submitted = subprocess.run(["sbatch", "--parsable", str(script)], cwd=tmp_path, capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 120
        events = []
        while time.monotonic() < deadline:
            events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
            if [e["event"] for e in events].count("exited") >= 2:
                break
            time.sleep(1)
        stops = [e for e in events if e["event"] == "stopped"]
        events = [e for e in events if e["event"] != "stopped"]
        assert [e["event"] for e in events] == ["started", "exited", "requeue", "started", "exited"], events
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    assert len(stops) == 1
    assert {e["job_id"] for e in events} == {job_id}
    assert [e["restart"] for e in events] == [0, 0, 0, 1, 1]
    # srun reports 75, or the kill of the other node's task when the first 75 made it end the step
    # (--kill-on-bad-exit): either way the `stopped` logged in this allocation makes it a requeue.
    assert events[1]["class"] == "requeued" and events[1]["rc"] != 0
    assert events[4]["rc"] == 0 and events[4]["class"] == "finished"
    assert events[0]["nodes"] and all(c.isalnum() or c in "[]-," for c in events[0]["nodes"])
    launches = sorted((run_dir / "launch.log").read_text().splitlines())
    expected = [
        f"{node} restart={restart} argv=launch {run_dir} probe=a b $HOME `x`"
        for restart in (0, 1)
        for node in slurm_cluster.nodes
    ]
    assert launches == sorted(expected)  # one launch per node per start, the env value literal
    output = (run_dir / f"slurm-{job_id}.out").read_text()
    assert output.count("setup-ran on ") == 2  # --open-mode=append kept the first run's output

"""The batch-script templates compiled once and kept on disk (hpcds.cli.template_cache): the same output as compiling,
an edited template or other environment settings never served old code, and a cache folder that cannot be used (not
a folder, writable by others, damaged files) only costs the compile."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
from jinja2.bccache import bc_magic

from hpcds.cli.template_cache import TemplateCache

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "#SBATCH --nodes={{ nodes }}\n{% for host in hosts %}\n{{ host }}\n{% endfor %}\n"


def environment(templates: Path, cache: TemplateCache | None, **settings) -> jinja2.Environment:
    """A fresh environment (its own in-memory cache empty), as each `hpcds` process starts with."""
    options = {"trim_blocks": True, "keep_trailing_newline": True, **settings}
    return jinja2.Environment(loader=jinja2.FileSystemLoader(templates), bytecode_cache=cache, **options)


def render(env: jinja2.Environment) -> str:
    return env.get_template("job.j2").render(nodes=2, hosts=["a", "b"])


def compile_count(env: jinja2.Environment) -> list[str]:
    """Records every template the environment compiles from source."""
    compiled: list[str] = []
    original = env.compile

    def counting(source, name=None, filename=None, *args, **kwargs):
        compiled.append(name)
        return original(source, name, filename, *args, **kwargs)

    env.compile = counting
    return compiled


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "job.j2").write_text(TEMPLATE)
    return folder


def test_second_process_loads_the_compiled_template_and_renders_the_same(templates, tmp_path):
    cache = TemplateCache(tmp_path / "cache")
    uncached = render(environment(templates, None))
    first = environment(templates, cache)
    compiled = compile_count(first)
    assert render(first) == uncached
    assert compiled == ["job.j2"]
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].suffix == ".jinja2"
    assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o700
    second = environment(templates, TemplateCache(tmp_path / "cache"))
    compiled = compile_count(second)
    assert render(second) == uncached
    assert compiled == [], "the second environment compiled the template instead of loading it"


def test_an_edited_template_is_compiled_again_and_its_file_replaced(templates, tmp_path):
    cache = TemplateCache(tmp_path / "cache")
    render(environment(templates, cache))
    (templates / "job.j2").write_text(TEMPLATE.replace("--nodes=", "--nodes "))
    env = environment(templates, cache)
    compiled = compile_count(env)
    assert render(env).startswith("#SBATCH --nodes 2\n")
    assert compiled == ["job.j2"]
    again = environment(templates, cache)
    assert compile_count(again) == [] and render(again).startswith("#SBATCH --nodes 2\n")
    assert len(list((tmp_path / "cache").iterdir())) == 1, "the old file was left beside the new one"


def test_other_environment_settings_never_reuse_the_code(templates, tmp_path):
    cache = TemplateCache(tmp_path / "cache")
    trimmed = render(environment(templates, cache))
    env = environment(templates, cache, trim_blocks=False)
    compiled = compile_count(env)
    untrimmed = render(env)
    assert compiled == ["job.j2"]
    assert untrimmed != trimmed and untrimmed == render(environment(templates, None, trim_blocks=False))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "garbage after the header"])
def test_a_damaged_file_is_compiled_again(templates, tmp_path, damage):
    cache = TemplateCache(tmp_path / "cache")
    expected = render(environment(templates, cache))
    (stored,) = (tmp_path / "cache").iterdir()
    data = stored.read_bytes()
    damaged = {
        "truncated": data[: len(data) // 2],
        "garbage": os.urandom(len(data)),
        "empty": b"",
        "garbage after the header": bc_magic + b"\xff" + data[len(bc_magic) + 1 :],  # the checksum's pickle broken
    }
    stored.write_bytes(damaged[damage])
    env = environment(templates, cache)
    compiled = compile_count(env)
    assert render(env) == expected
    assert compiled == ["job.j2"]
    assert stored.read_bytes() == data, "the damaged file was not replaced by the compiled code"


def test_an_unusable_cache_folder_only_costs_the_compile(templates, tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    expected = render(environment(templates, None))
    env = environment(templates, TemplateCache(not_a_folder / "cache"))
    assert render(env) == expected
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could plant code here: not used
    for _ in range(2):
        env = environment(templates, TemplateCache(shared))
        compiled = compile_count(env)
        assert render(env) == expected
        assert compiled == ["job.j2"]
    assert list(shared.iterdir()) == []


def test_hpcds_render_writes_the_cache_once_and_then_reads_it(tmp_path):
    """Two `hpcds render` processes: the same script; the second leaves the file as the first wrote it (a compile
    would have replaced it: a new inode)."""
    env = {**os.environ, "HPCDS_CACHE_DIR": str(tmp_path / "hpcds-cache")}
    argv = [sys.executable, "-m", "hpcds", "render", "configs/quickstart.yaml", "--run-dir", str(tmp_path / "run")]
    outputs, inodes = [], []
    for _ in range(2):
        result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        outputs.append(result.stdout)
        (stored,) = (tmp_path / "hpcds-cache" / "templates").iterdir()
        inodes.append(stored.stat().st_ino)
    assert outputs[0] == outputs[1] and outputs[0].startswith("#!/bin/bash")
    assert inodes[0] == inodes[1]


def test_no_home_folder_means_no_cache(monkeypatch):
    from hpcds import deepspeed_check
    from hpcds.cli.common import use_template_cache
    from hpcds.render import sbatch

    def no_home():
        raise RuntimeError("Could not determine home directory.")  # what pathlib says without HOME or passwd entry

    for var in ("HPCDS_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    monkeypatch.setattr(sbatch, "bytecode_cache", None)
    use_template_cache()
    assert sbatch.bytecode_cache is None
    assert deepspeed_check._cache_file("{}") is None  # DeepSpeed's verdict is asked for, not kept

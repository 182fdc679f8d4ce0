"""Environment settings: one typed class, the README table generated from it, no stray reads."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cutout.jobs.errors import ConfigError
from cutout.jobs.settings import env_names, markdown_table, readme_region, redact_url, settings

REPO = Path(__file__).resolve().parent.parent
CODE_DIRS = ("jobs", "workers", "cutout", "benchmarks")
NAME = re.compile(r"CUTOUT_[A-Z0-9_]*[A-Z0-9]")


def _python_sources():
    for folder in CODE_DIRS:
        yield from sorted((REPO / folder).rglob("*.py"))


def test_defaults_and_types():
    s = settings()
    assert s.broker_url.startswith("redis://")
    assert isinstance(s.batch_size, int) and isinstance(s.storage_read_timeout, float)


def test_a_changed_environment_is_seen_at_once(monkeypatch):
    monkeypatch.setenv("CUTOUT_BATCH_SIZE", "3")
    assert settings().batch_size == 3
    monkeypatch.setenv("CUTOUT_BATCH_SIZE", "5")
    assert settings().batch_size == 5
    monkeypatch.delenv("CUTOUT_BATCH_SIZE")
    assert settings().batch_size == 8


def test_empty_variable_counts_as_unset(monkeypatch):
    monkeypatch.setenv("CUTOUT_REDIS_URL", "")
    monkeypatch.setenv("CUTOUT_THREADS", "")
    assert settings().redis_url is None and settings().threads is None


def test_bad_value_is_one_line_naming_the_variable(monkeypatch):
    monkeypatch.setenv("CUTOUT_STORAGE_RETRIES", "many")
    with pytest.raises(ConfigError) as info:
        settings()
    message = str(info.value)
    assert "CUTOUT_STORAGE_RETRIES='many'" in message and "\n" not in message


def test_runtime_is_normalised_and_checked(monkeypatch):
    monkeypatch.setenv("CUTOUT_RUNTIME", " Torch ")
    assert settings().runtime == "torch"
    monkeypatch.setenv("CUTOUT_RUNTIME", "tensorflow")
    with pytest.raises(ConfigError, match="CUTOUT_RUNTIME"):
        settings()


def test_readme_table_is_the_generated_one():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert readme_region(readme) == markdown_table(), (
        "README's settings table is stale: run python -m cutout.jobs.settings --write-readme README.md")


def test_markdown_command_prints_the_table():
    out = subprocess.run([sys.executable, "-m", "cutout.jobs.settings", "--markdown"],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == markdown_table()
    assert all(f"`{name}`" in out for name in env_names())


def test_every_cutout_name_in_the_code_is_a_settings_field():
    known = set(env_names())
    unknown = {}
    for path in _python_sources():
        if path.name == "settings.py":
            continue
        for name in NAME.findall(path.read_text(encoding="utf-8")):
            if name not in known:
                unknown.setdefault(name, str(path.relative_to(REPO)))
    assert not unknown, f"CUTOUT_* names that are not fields of cutout.jobs.settings.Settings: {unknown}"


def test_no_direct_environment_reads_of_cutout_variables():
    read = re.compile(r"""(os\.environ\.get|os\.getenv|os\.environ\[)\(?\s*["']CUTOUT_""")
    offenders = []
    for path in _python_sources():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if read.search(line) and not re.search(r"os\.environ\[[^\]]+\]\s*=[^=]", line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "read CUTOUT_* through cutout.jobs.settings.settings():\n" + "\n".join(offenders)


def test_every_variable_of_scripts_and_containers_is_in_the_readme():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    files = [REPO / "docker-compose.yml", *sorted((REPO / "infra").iterdir())]
    missing = {name: f.name for f in files if f.is_file()
               for name in NAME.findall(f.read_text(encoding="utf-8")) if f"`{name}`" not in readme}
    assert not missing, f"undocumented in README.md: {missing}"


def test_redact_url_hides_userinfo():
    assert redact_url("redis://:secret@host:6379/0") == "redis://:***@host:6379/0"
    assert redact_url("rediss://user:pw@h/1 and s3://bucket/key") == "rediss://user:***@h/1 and s3://bucket/key"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


# --- settings are read when used, never frozen at import -----------------------------------------
def _import_time_nodes(tree: ast.Module):
    """Every node Python evaluates when the module is imported: top-level statements, class
    bodies, decorators and default values, but not the bodies of functions or lambdas."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        yield node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            pending.extend([*node.decorator_list, *args.defaults, *filter(None, args.kw_defaults)])
            if node.returns is not None:
                pending.append(node.returns)
        elif isinstance(node, ast.Lambda):
            pending.extend([*node.args.defaults, *filter(None, node.args.kw_defaults)])
        else:
            pending.extend(ast.iter_child_nodes(node))


def test_no_module_of_jobs_workers_or_cutout_reads_settings_at_import():
    offenders = []
    for folder in ("jobs", "workers", "cutout"):
        for path in sorted((REPO / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in _import_time_nodes(tree):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                        and node.func.id == "settings"):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == [], "settings() read at import (freezes the environment): " + ", ".join(offenders)


def test_every_module_imports_under_an_invalid_setting():
    """An indirect read at import (a helper called at module level) would raise ConfigError here."""
    code = ("import importlib, pkgutil, cutout.jobs, cutout.workers\n"
            "for pkg in (cutout.jobs, cutout.workers):\n"
            "    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
            "        importlib.import_module(info.name)\n")
    env = {**os.environ, "CUTOUT_BATCH_SIZE": "not-a-number", "CUTOUT_ITEM_ATTEMPTS": "x"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_variable_changed_after_import_takes_effect(monkeypatch):
    from cutout.jobs.errors import TransientStorageError
    from cutout.workers.items import with_item_retries

    def attempts_until_given_up() -> int:
        calls = []

        def always_transient():
            calls.append(1)
            raise TransientStorageError("503 SlowDown")

        with pytest.raises(TransientStorageError, match="gave up"):
            with_item_retries("read x", always_transient)
        return len(calls)

    monkeypatch.setenv("CUTOUT_ITEM_BACKOFF_S", "0")
    monkeypatch.setenv("CUTOUT_ITEM_ATTEMPTS", "2")
    assert attempts_until_given_up() == 2
    monkeypatch.setenv("CUTOUT_ITEM_ATTEMPTS", "4")
    assert attempts_until_given_up() == 4


def test_the_task_retry_cap_is_read_when_a_retry_is_decided(monkeypatch):
    from cutout.workers.tasks import process_shard_task

    monkeypatch.setenv("CUTOUT_TASK_MAX_RETRIES", "1")
    assert process_shard_task.max_retries == 1
    monkeypatch.setenv("CUTOUT_TASK_MAX_RETRIES", "7")
    assert process_shard_task.max_retries == 7

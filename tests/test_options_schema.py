"""One options schema: every user-facing ``PipelineOptions`` field reaches every surface (the
flags of run/submit/redo/eval, the job file, redo's overrides, the Python API's keywords), and
``redo`` stores every option it accepts. Inputs named as a path or as ``file://`` are one input.
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import redis

import cutout
from cutout.jobs import manifest, sharding, storage
from cutout.jobs.cli import build_parser
from cutout.jobs.cli_options import chosen_options, options_from_args
from cutout.jobs.jobfile import read_job_file
from cutout.jobs.spec import PipelineOptions, user_option_fields
from tests.test_job_integration import REPO_ROOT
from tests.test_report_html import build_job

FUSED = "isnet-general+u2netp"
# A value other than the default for each user-facing field, as typed on a command line, and the
# field's value it must become. Fields are checked together, on a fused model (fusion and
# model_sizes need one); ``weights`` alone, on a single model (a fused model refuses it).
SAMPLES = {
    "preset": ("best", "best"),
    "model": (FUSED, FUSED),
    "classes": ("person,dog", ("person", "dog")),
    "select_by": ("maskrcnn", "maskrcnn"),
    "weights": ("/models/own-u2netp.onnx", "/models/own-u2netp.onnx"),
    "score_threshold": ("0.25", 0.25),
    "seg_size": ("320", 320),
    "fusion": ("mean", "mean"),
    "model_sizes": ("isnet-general=768,u2netp=320", (("isnet-general", 768), ("u2netp", 320))),
    "refine": ("none", "none"),
    "objects": ("all", "all"),
    "escalate": ("fast", "fast"),
    "escalate_below": ("0.7", 0.7),
    "escalate_apart": ("0.3", 0.3),
    "trimap_band": ("0.02", 0.02),
    "matting": ("knn", "knn"),
    "background": ("color:#00ff00", "color:#00ff00"),
    "format": ("webp", "webp"),
    "quality": ("77", 77),
    "max_pixels": ("1000000", 1_000_000),
    "crop": ("true", True),
}
ALONE = {"weights": {"model": "u2netp"}}  # fields checked apart, with the fields they need
PIPELINE_COMMANDS = ("run", "submit", "redo", "eval")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _argv(names) -> list[str]:
    return [arg for name in names for arg in (_flag(name), SAMPLES[name][0])]


def _groups() -> list[tuple[list[str], dict[str, str]]]:
    """(fields, the companion options they need): the fused group, then each ALONE field."""
    together = [name for name in SAMPLES if name not in ALONE]
    return [(together, {}), *[([name], companions) for name, companions in ALONE.items()]]


def _subparser(command: str):
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices[command]


def test_samples_cover_the_schema():
    assert set(SAMPLES) == set(user_option_fields())
    assert set(user_option_fields()) < set(PipelineOptions.model_fields)  # internal fields exist too


@pytest.mark.parametrize("command", PIPELINE_COMMANDS)
def test_every_user_option_is_a_flag_of_each_pipeline_command(command):
    sub = _subparser(command)
    actions = {option: action for action in sub._actions for option in action.option_strings}
    for name, info in user_option_fields().items():
        action = actions.get(_flag(name))
        assert action is not None and action.dest == name, (command, name)
        assert action.default is None, (command, name)  # "not given": the schema's default applies
        assert info.description and info.description in (action.help or ""), (command, name)
    fixed = {"run": ["x.png", "--out", "o"], "submit": ["x.png", "--to", "o"], "redo": ["JOB"], "eval": []}
    for names, companions in _groups():
        argv = [*fixed[command], *[a for k, v in companions.items() for a in (_flag(k), v)], *_argv(names)]
        args = sub.parse_args(argv)
        assert set(chosen_options(args)) == {*names, *companions}, command
        options = options_from_args(args)
        for name in names:
            assert getattr(options, name) == SAMPLES[name][1], (command, name)


def test_literal_fields_offer_their_choices_and_refuse_others():
    sub = _subparser("run")
    actions = {action.dest: action for action in sub._actions}
    assert actions["format"].choices == ["png", "webp", "webp-lossy", "jpeg"]
    assert actions["preset"].choices == ["fast", "balanced", "best", "auto"]
    with pytest.raises(SystemExit):
        sub.parse_args(["x", "--out", "o", "--refine", "sometimes"])


def test_every_option_is_a_job_file_key(tmp_path):
    for index, (names, companions) in enumerate(_groups()):
        path = tmp_path / f"job{index}.toml"
        path.write_text("".join(f'{k} = "{v}"\n' for k, v in companions.items())
                        + "[pipeline]\n" + "".join(f'{name} = "{SAMPLES[name][0]}"\n' for name in names))
        values = read_job_file(str(path))
        options = PipelineOptions(**values)
        for name in names:
            assert getattr(options, name) == SAMPLES[name][1], name
    internal = set(PipelineOptions.model_fields) - set(user_option_fields())
    path = tmp_path / "internal.toml"
    path.write_text("".join(f"{name} = {value}\n" for name, value in {
        "size_rule": '"max"', "seg_sizes": "[512, 768]", "mask_ramp": "[0.1, 0.6]", "trimap_fg": 0.9,
        "trimap_bg": 0.1, "matting_max_side": 512, "matting_max_unknown": 0.5}.items() if name in internal))
    assert set(read_job_file(str(path))) == internal  # every internal field is a key too


@pytest.mark.parametrize("function", [cutout.remove_background, cutout.Session])
def test_every_user_option_is_a_keyword_of_the_python_api(function):
    parameters = inspect.signature(function).parameters
    for name, info in user_option_fields().items():
        parameter = parameters.get(name)
        assert parameter is not None and parameter.kind is inspect.Parameter.KEYWORD_ONLY, name
        assert parameter.default is None, name
        assert info.description in inspect.getdoc(function.__init__ if function is cutout.Session else function)
    for names, companions in _groups():
        session = cutout.Session(**companions, **{name: SAMPLES[name][0] for name in names})
        for name in names:
            assert getattr(session.options, name) == SAMPLES[name][1], name


def test_an_unknown_api_keyword_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="score_treshold"):
        cutout.Session(score_treshold=0.2)
    with pytest.raises(TypeError, match="trimap_fg"):  # internal: set through options=PipelineOptions(...)
        cutout.remove_background(b"", trimap_fg=0.9)
    session = cutout.Session(options=PipelineOptions(trimap_fg=0.9), model="threshold")
    assert session.options == PipelineOptions(trimap_fg=0.9, model="threshold")  # as redo would


# --- redo, through the real CLI against a finished job ----------------------------------------
@pytest.fixture
def job_env(redis_server, tmp_path):
    """A finished job and an environment whose broker and progress use a Redis database of their
    own (no worker takes these shards); emptied afterwards."""
    prefix, job_id = build_job(tmp_path)
    url = redis_server.url.rsplit("/", 1)[0] + "/9"
    yield prefix, job_id, {**os.environ, "CUTOUT_BROKER_URL": url, "CUTOUT_REDIS_URL": url}
    redis.Redis.from_url(url).flushdb()


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cutout.jobs.cli", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def _done_inputs(prefix: str) -> list[str]:
    return [r.input_uri for r in manifest.iter_records(prefix) if r.status == "done"]


def _redo_spec(dest: str, result: subprocess.CompletedProcess):
    assert result.returncode == 0, result.stderr
    return manifest.load_spec(sharding.job_prefix(dest, result.stdout.split()[0]))


def test_redo_stores_every_override_it_accepts(job_env):
    prefix, job_id, env = job_env
    dest = manifest.load_spec(prefix).destination
    first = _done_inputs(prefix)[0]
    for names, companions in _groups():
        extra = [a for k, v in companions.items() for a in (_flag(k), v)]
        redo = _cli("redo", job_id, "--dest", dest, "--input", first, *extra, *_argv(names), env=env)
        pipeline = _redo_spec(dest, redo).pipeline
        stored = {name: getattr(pipeline, name) for name in names}
        assert stored == {name: SAMPLES[name][1] for name in names}


def test_redo_with_another_preset_gets_that_presets_settings(job_env):
    prefix, job_id, env = job_env
    dest = manifest.load_spec(prefix).destination
    first = _done_inputs(prefix)[0]
    redo = _cli("redo", job_id, "--dest", dest, "--input", first, "--preset", "best", env=env)
    assert _redo_spec(dest, redo).pipeline == PipelineOptions(preset="best")  # not balanced's sizes
    kept = _cli("redo", job_id, "--dest", dest, "--input", first, "--preset", "fast", "--matting", "knn", env=env)
    assert _redo_spec(dest, kept).pipeline == PipelineOptions(preset="fast", matting="knn")


def test_a_file_uri_and_a_path_name_the_same_input(job_env):
    prefix, job_id, env = job_env
    dest = manifest.load_spec(prefix).destination
    first = _done_inputs(prefix)[0]
    assert first.startswith("/")  # the manifest names local inputs by path
    redo = _cli("redo", job_id, "--dest", dest, "--input", "file://" + first, env=env)
    spec = _redo_spec(dest, redo)
    assert storage.read_bytes(spec.sources[0]).decode().split() == [first]
    failed = next(r.input_uri for r in manifest.iter_records(prefix) if r.status == "failed")
    retry = _cli("retry-failed", job_id, "--dest", dest, "--input", "file://" + failed, env=env)
    assert retry.returncode == 0 and "1 failed inputs in 1 shards" in retry.stdout, retry.stderr

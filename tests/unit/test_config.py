"""Reading conveyor.toml into Config values."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from conveyor.config import ConfigError, builtin_config_path, load_config, parse_config
from conveyor.pipelines import ParamsError


def write(folder: Path, text: str, name: str = "conveyor.toml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def parse(data, base=Path("/srv/conf"), env=None):
    return parse_config(data, base, env or {})


MINIMAL = {"pipelines": {"echo": {"executor": "command", "command": ["echo", "{msg}"]}}}


# unknown keys ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"bogus": 1}, "bogus"),
        ({"conveyor": {"databse": "sqlite://"}}, "conveyor.databse"),
        (
            {"pipelines": {"echo": {"executor": "command", "command": ["echo"], "retry": 3}}},
            "pipelines.echo.retry",
        ),
    ],
)
def test_unknown_keys_are_rejected_by_name(data, key):
    with pytest.raises(ConfigError) as info:
        parse(data)
    assert str(info.value).startswith(f"{key}:")


@pytest.mark.parametrize(
    ("pipeline", "key"),
    [
        ({"executor": "shell", "command": ["x"]}, "executor"),
        ({"executor": "command", "command": ["x"], "timeout": 0}, "timeout"),
        ({"executor": "command", "command": ["x"], "retries": -1}, "retries"),
        ({"executor": "command", "command": ["x"], "concurrency": 0}, "concurrency"),
        ({"executor": "command", "command": "echo hi"}, "command"),
        ({"executor": "command", "command": []}, "command"),
        ({"executor": "command", "command": ["echo", "{oops"]}, "command"),
        ({"executor": "command", "command": ["echo", "a\0b"]}, "command"),
        # TOML has inf and nan: no clock reaches such a timeout
        ({"executor": "command", "command": ["x"], "timeout": float("inf")}, "timeout"),
        ({"executor": "command", "command": ["x"], "backoff": float("nan")}, "backoff"),
        # what no process environment can hold
        ({"executor": "command", "command": ["x"], "env": {"A": "x\0y"}}, "env"),
        ({"executor": "command", "command": ["x"], "env": {"A=B": "1"}}, "env"),
        ({"executor": "command", "command": ["x"], "env": {"": "1"}}, "env"),
        # what Conveyor sets for each attempt
        ({"executor": "command", "command": ["x"], "env": {"CONVEYOR_WORK_DIR": "/x"}}, "env"),
        ({"executor": "command", "command": ["x"], "env": {"CONVEYOR_TASK_ID": "1"}}, "env"),
    ],
)
def test_bad_values_are_rejected_with_the_key_named(pipeline, key):
    with pytest.raises(ConfigError) as info:
        parse({"pipelines": {"p": pipeline}})
    assert str(info.value).startswith(f"pipelines.p.{key}")


def test_stray_brace_error_says_so():
    with pytest.raises(ConfigError, match="stray brace"):
        parse({"pipelines": {"p": {"executor": "command", "command": ["echo", "x}"]}}})


# executor-specific requirements ---------------------------------------------------


def test_command_executor_needs_a_command():
    with pytest.raises(ConfigError, match=r"pipelines\.p: .*command"):
        parse({"pipelines": {"p": {"executor": "command"}}})


def test_python_executor_needs_a_handler():
    with pytest.raises(ConfigError, match=r"pipelines\.p: .*handler"):
        parse({"pipelines": {"p": {"executor": "python"}}})


@pytest.mark.parametrize(
    "handler",
    ["conveyor.examples.handlers.noop", "noop", "conveyor.examples.handlers:", ":noop", ":"],
)
def test_handler_must_be_module_colon_function(handler):
    with pytest.raises(ConfigError) as info:
        parse({"pipelines": {"p": {"executor": "python", "handler": handler}}})
    assert "pipelines.p.handler" in str(info.value)
    assert "module:function" in str(info.value)


def test_a_python_pipeline():
    config = parse(
        {
            "pipelines": {
                "noop": {
                    "executor": "python",
                    "handler": "conveyor.examples.handlers:noop",
                    "queue": "urgent",
                    "priority": 5,
                    "retries": 3,
                    "backoff": 2.5,
                    "backoff_max": 30,
                    "timeout": 60,
                    "concurrency": 2,
                    "cache": 3600,
                }
            }
        }
    )
    p = config.pipelines["noop"]
    assert p.name == "noop"
    assert p.executor == "python"
    assert p.handler == "conveyor.examples.handlers:noop"
    assert (p.queue, p.priority, p.timeout, p.concurrency, p.cache) == ("urgent", 5, 60, 2, 3600)
    assert p.retry.max_attempts == 4
    assert p.retry.backoff_base == 2.5
    assert p.retry.backoff_max == 30


def test_command_becomes_an_argv_tuple_and_cwd_is_relative_to_the_config(tmp_path):
    config = parse(
        {
            "pipelines": {
                "p": {
                    "executor": "command",
                    "command": ["echo", "{msg}"],
                    "cwd": "jobs",
                    "env": {"MODE": "fast"},
                }
            }
        },
        base=tmp_path,
    )
    p = config.pipelines["p"]
    assert p.command == ("echo", "{msg}")
    assert p.cwd == str((tmp_path / "jobs").resolve())
    assert dict(p.env) == {"MODE": "fast"}


def test_a_command_pipeline_may_go_without_a_work_directory():
    config = parse(
        {"pipelines": {"p": {"executor": "command", "command": ["true"], "work_dir": False}}}
    )
    assert config.pipelines["p"].work_dir is False
    assert parse(MINIMAL).pipelines["echo"].work_dir is True


SPOTBOT_MAPPING = str(builtin_config_path().parent / "spotbot.mapping.toml")


@pytest.mark.parametrize(
    ("pipeline", "key", "says"),
    [
        ({"executor": "python", "handler": "m:f"}, "work_dir", "only executor 'command'"),
        ({"executor": "ssh", "command": ["x"], "hosts": ["h"]}, "work_dir", "only executor"),
        ({"executor": "command", "command": ["x"], "outputs": ["*.csv"]}, "outputs", "collected"),
        (
            {"executor": "command", "command": ["x", "--out={conveyor.work_dir}/o"]},
            "command",
            "{conveyor.work_dir} names the task's work directory",
        ),
        (
            {
                "executor": "command",
                "command": ["x"],
                "load_sqlite": {"file": "{conveyor.work_dir}/r.db", "mapping": SPOTBOT_MAPPING},
            },
            "load_sqlite.file",
            "{conveyor.work_dir}",
        ),
        (
            {
                "executor": "command",
                "command": ["x"],
                "load_sqlite": {"file": "out/r.db", "mapping": SPOTBOT_MAPPING},
            },
            "load_sqlite.file",
            "'out/r.db' is a relative path",
        ),
    ],
)
def test_what_needs_a_work_directory_is_refused_without_one_by_name(pipeline, key, says):
    data = {
        "hosts": {"h": {"address": "127.0.0.1", "user": "u", "key_file": "/k"}},
        "pipelines": {"p": {**pipeline, "work_dir": False}},
    }
    with pytest.raises(ConfigError) as info:
        parse(data)
    assert str(info.value).startswith(f"pipelines.p.{key}: ")
    assert says in str(info.value)
    assert "work_dir = false" in str(info.value) or key == "work_dir"


# schema ----------------------------------------------------------------------------


def test_inline_schema_is_used_to_check_params(tmp_path):
    config = parse(
        {
            "pipelines": {
                "p": {
                    "executor": "python",
                    "handler": "m:f",
                    "schema": {"type": "object", "required": ["n"]},
                }
            }
        },
        base=tmp_path,
    )
    p = config.pipelines["p"]
    assert p.schema == {"type": "object", "required": ["n"]}
    with pytest.raises(ParamsError, match="'n' is a required property"):
        p.check_params({})


def test_schema_file_is_relative_to_the_config_file(tmp_path, monkeypatch):
    folder = tmp_path / "etc"
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    (folder / "schemas").mkdir(parents=True)
    (folder / "schemas" / "p.json").write_text(json.dumps(schema))
    path = write(
        folder,
        """
        [pipelines.p]
        executor = "python"
        handler = "m:f"
        schema = "schemas/p.json"
        """,
    )
    monkeypatch.chdir(tmp_path)  # elsewhere: the path must not depend on the cwd
    config = load_config(path, env={})
    assert config.pipelines["p"].schema == schema


def test_missing_schema_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"pipelines\.p\.schema: cannot read"):
        parse(
            {"pipelines": {"p": {"executor": "python", "handler": "m:f", "schema": "nope.json"}}},
            base=tmp_path,
        )


def test_schema_file_that_is_not_json_is_a_config_error(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"pipelines\.p\.schema: .*not JSON"):
        parse(
            {"pipelines": {"p": {"executor": "python", "handler": "m:f", "schema": "bad.json"}}},
            base=tmp_path,
        )


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "nonsense"},
        {"type": "object", "required": "n"},
        {"type": "object", "properties": {"n": {"minimum": "zero"}}},
    ],
)
def test_invalid_json_schema_is_rejected(schema, tmp_path):
    with pytest.raises(ConfigError, match=r"pipelines\.p\.schema is not a valid JSON Schema"):
        parse(
            {"pipelines": {"p": {"executor": "python", "handler": "m:f", "schema": schema}}},
            base=tmp_path,
        )


def test_invalid_json_schema_in_a_file_is_rejected(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps({"type": 12}))
    with pytest.raises(ConfigError, match="not a valid JSON Schema"):
        parse(
            {"pipelines": {"p": {"executor": "python", "handler": "m:f", "schema": "s.json"}}},
            base=tmp_path,
        )


# database, artifacts, queues ------------------------------------------------------------


def test_defaults(tmp_path):
    config = parse({}, base=tmp_path)
    assert config.pipelines == {}
    assert config.database_url == f"sqlite:///{(tmp_path / 'conveyor.db').resolve()}"
    assert config.artifacts_dir == (tmp_path / "artifacts").resolve()
    assert config.queue_order == ("urgent", "production", "default", "test", "dev")
    assert config.lease == 30.0
    assert config.poll_interval == 1.0


def test_database_from_the_file(tmp_path):
    config = parse({"conveyor": {"database": "postgresql://db/conveyor"}}, base=tmp_path)
    assert config.database_url == "postgresql://db/conveyor"


def test_environment_overrides_the_database_and_artifacts(tmp_path):
    config = parse(
        {"conveyor": {"database": "postgresql://db/conveyor", "artifacts": "arts"}},
        base=tmp_path,
        env={"CONVEYOR_DATABASE_URL": "sqlite:////tmp/x.db", "CONVEYOR_ARTIFACTS": "/store"},
    )
    assert config.database_url == "sqlite:////tmp/x.db"
    assert config.artifacts_dir == Path("/store")


def test_empty_environment_value_does_not_override(tmp_path):
    config = parse(
        {"conveyor": {"database": "postgresql://db/c"}},
        base=tmp_path,
        env={"CONVEYOR_DATABASE_URL": ""},
    )
    assert config.database_url == "postgresql://db/c"


def test_relative_artifacts_are_beside_the_config(tmp_path):
    config = parse({"conveyor": {"artifacts": "data/arts"}}, base=tmp_path)
    assert config.artifacts_dir == (tmp_path / "data" / "arts").resolve()


def test_queue_order_lease_and_poll_interval(tmp_path):
    config = parse(
        {"conveyor": {"queues": ["hi", "lo"], "lease": 5, "poll_interval": 0.1}}, base=tmp_path
    )
    assert config.queue_order == ("hi", "lo")
    assert config.lease == 5
    assert config.poll_interval == 0.1
    with pytest.raises(ConfigError, match=r"conveyor\.lease"):
        parse({"conveyor": {"lease": 0}}, base=tmp_path)


# load_config ------------------------------------------------------------------------------


def test_load_config_reads_the_named_file(tmp_path):
    path = write(
        tmp_path / "conf",
        """
        [pipelines.echo]
        executor = "command"
        command = ["echo", "{msg}"]
        """,
    )
    config = load_config(path, env={})
    assert set(config.pipelines) == {"echo"}
    assert config.source == path
    assert config.database_url == f"sqlite:///{(tmp_path / 'conf' / 'conveyor.db').resolve()}"


def test_load_config_from_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "elsewhere", "[pipelines.n]\nexecutor='python'\nhandler='m:f'\n")
    config = load_config(None, env={"CONVEYOR_CONFIG": str(path)})
    assert set(config.pipelines) == {"n"}


def test_load_config_finds_conveyor_toml_in_the_cwd(tmp_path, monkeypatch):
    write(tmp_path, "[pipelines.here]\nexecutor='python'\nhandler='m:f'\n")
    monkeypatch.chdir(tmp_path)
    config = load_config(env={})
    assert set(config.pipelines) == {"here"}


def test_load_config_database_env_override(tmp_path):
    path = write(tmp_path, "[conveyor]\ndatabase = 'sqlite:///file.db'\n")
    config = load_config(path, env={"CONVEYOR_DATABASE_URL": "postgresql://h/db"})
    assert config.database_url == "postgresql://h/db"


def test_missing_named_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml", env={})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(None, env={"CONVEYOR_CONFIG": str(tmp_path / "nope.toml")})


def test_invalid_toml_names_the_file(tmp_path):
    path = write(tmp_path, "[pipelines.p\nexecutor = ")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(path) in str(info.value)
    assert "TOML" in str(info.value)


def test_errors_in_a_file_name_the_key(tmp_path):
    path = write(tmp_path, "[pipelines.p]\nexecutor = 'python'\nhandler = 'm:f'\nqueu = 'x'\n")
    with pytest.raises(ConfigError, match=r"^pipelines\.p\.queu:"):
        load_config(path, env={})


# the built-in examples -----------------------------------------------------------------------


def test_builtin_examples_load(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(None, env={})
    assert config.source == builtin_config_path()
    assert {"spotbot", "noop", "sleep"} <= set(config.pipelines)
    # their database and artifacts go to the current directory, not into the package
    assert config.database_url == f"sqlite:///{(tmp_path / 'conveyor.db').resolve()}"
    assert config.artifacts_dir == (tmp_path / "artifacts").resolve()


def test_builtin_spotbot_pipeline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spotbot = load_config(None, env={}).pipelines["spotbot"]
    assert spotbot.executor == "command"
    assert spotbot.split == "logs_to_process"
    assert spotbot.concurrency == 8
    assert spotbot.retry.max_attempts == 3
    assert spotbot.schema is not None  # read from spotbot.schema.json beside the toml
    entry = {
        "rawbinlog_bin": "D:/logs/run1/rawbinlog.bin",
        "rawbinlog_time": "2024-01-01T00:00:00",
        "protocols_xml": "D:/logs/protocols.xml",
        "output_dir": "D:/logs/run1",
    }
    tasks = spotbot.check_params({"logs_to_process": [entry, entry]})
    assert tasks == [entry, entry]
    with pytest.raises(ParamsError) as info:
        spotbot.check_params({"logs_to_process": [entry, {**entry, "output_dir": ""}]})
    assert info.value.path == "$.logs_to_process[1].output_dir"


def test_builtin_python_pipelines(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pipelines = load_config(None, env={}).pipelines
    assert pipelines["noop"].handler == "conveyor.examples.handlers:noop"
    assert pipelines["sleep"].check_params({"seconds": 1}) == [{"seconds": 1}]
    with pytest.raises(ParamsError) as info:
        pipelines["sleep"].check_params({"seconds": -1})
    assert info.value.path == "$.seconds"
    with pytest.raises(ParamsError, match="seconds"):
        pipelines["sleep"].check_params({})


def test_builtin_config_file_loads_when_named(tmp_path):
    config = load_config(builtin_config_path(), env={"CONVEYOR_DATABASE_URL": "sqlite:///x.db"})
    assert {"spotbot", "noop", "sleep"} <= set(config.pipelines)
    assert config.database_url == "sqlite:///x.db"


@pytest.mark.parametrize("name", ["a/b", "two words", "", "-lead", "é"])
def test_a_pipeline_name_that_would_change_a_url_or_a_key_is_refused(name):
    with pytest.raises(ConfigError) as info:
        parse({"pipelines": {name: {"executor": "command", "command": ["true"]}}})
    assert str(info.value).startswith("pipelines:") and repr(name) in str(info.value)


def test_pipeline_names_of_letters_digits_dots_dashes_and_underscores_are_fine():
    names = ["spotbot", "spotbot-remote", "kcidb_v4", "v1.2", "7up"]
    config = parse({"pipelines": {n: {"executor": "command", "command": ["true"]} for n in names}})
    assert sorted(config.pipelines) == sorted(names)

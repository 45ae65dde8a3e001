"""Command templates and checking what is submitted to a pipeline."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conveyor.pipelines import (
    ParamsError,
    Pipeline,
    TemplateError,
    command_values,
    json_path,
    render_argv,
    template_fields,
)

# template_fields --------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "fields"),
    [
        ("plain", []),
        ("", []),
        ("{a}", ["a"]),
        ("--out={output_dir}/x", ["output_dir"]),
        ("{a}{b}-{a}", ["a", "b", "a"]),
        ("{conveyor.work_dir}", ["conveyor.work_dir"]),
        ("{_x1.y_2}", ["_x1.y_2"]),
        ("{{a}}", []),
        ("{{{a}}}", ["a"]),
        ("{{", []),
        ("}}", []),
        ("json={{}}", []),
    ],
)
def test_template_fields(item, fields):
    assert template_fields(item) == fields


@pytest.mark.parametrize(
    "item",
    ["{", "}", "a}b", "{a", "a}", "{}", "{a b}", "{1a}", "{a.}", "{.a}", "{a-b}", "{{}", "{a}}b}"],
)
def test_stray_braces_are_rejected(item):
    with pytest.raises(TemplateError, match="stray brace"):
        template_fields(item)


# render_argv -----------------------------------------------------------------


def test_render_fills_placeholders_item_by_item():
    argv = render_argv(
        ("prog", "--bin", "{rawbinlog_bin}", "--out={output_dir}/result", "literal"),
        {"rawbinlog_bin": "a.bin", "output_dir": "/data/out"},
    )
    assert argv == ["prog", "--bin", "a.bin", "--out=/data/out/result", "literal"]


@pytest.mark.parametrize(
    "hostile",
    [
        "two words",
        "'quoted' \"double\"",
        "a; rm -rf /",
        "$(touch /tmp/pwned)",
        "`id`",
        "x && y || z | w > f < g",
        "line\nbreak",
        "--flag",
        "{not_a_field}",
        "",
    ],
)
def test_each_item_stays_one_argument_whatever_the_value(hostile):
    argv = render_argv(("prog", "{value}", "-v={value}"), {"value": hostile})
    assert argv == ["prog", hostile, f"-v={hostile}"]


def test_values_are_not_expanded_again():
    # a value that looks like a placeholder is data, not a template
    argv = render_argv(("{a}",), {"a": "{b}", "b": "secret"})
    assert argv == ["{b}"]


def test_brace_escapes_render_as_literal_braces():
    assert render_argv(("{{{a}}}", "{{a}}", "json={{}}"), {"a": "v"}) == ["{v}", "{a}", "json={}"]


def test_scalars_render_as_text():
    argv = render_argv(
        ("{i}", "{f}", "{t}", "{n}", "{zero}"),
        {"i": 3, "f": 2.5, "t": True, "n": False, "zero": 0},
    )
    assert argv == ["3", "2.5", "true", "false", "0"]


def test_dotted_fields_reach_nested_values():
    argv = render_argv(
        ("{conveyor.task_id}", "{opts.depth}"), {"conveyor": {"task_id": 9}, "opts": {"depth": 2}}
    )
    assert argv == ["9", "2"]


@pytest.mark.parametrize(
    ("command", "values"),
    [
        (("{missing}",), {"other": 1}),
        (("{a.b}",), {"a": {"c": 1}}),
        (("{a.b}",), {"a": "not a mapping"}),
    ],
)
def test_missing_field_is_a_template_error_naming_it(command, values):
    field = command[0][1:-1]
    with pytest.raises(TemplateError, match=f"'{field}'"):
        render_argv(command, values)


@pytest.mark.parametrize("value", [None, [1, 2], {"a": 1}, ("t",)])
def test_non_scalar_value_is_a_template_error(value):
    with pytest.raises(TemplateError, match="'v'"):
        render_argv(("prog", "{v}"), {"v": value})


def test_nul_byte_is_refused():
    with pytest.raises(TemplateError, match="NUL"):
        render_argv(("prog", "{v}"), {"v": "a\0b"})


def test_template_without_placeholders_needs_no_values():
    assert render_argv(("echo", "hi"), {}) == ["echo", "hi"]


@given(
    value=st.text().filter(lambda s: "\0" not in s),
    command=st.lists(
        st.sampled_from(["prog", "{v}", "x{v}y", "{{", "}}{v}", "--a", ""]), max_size=8
    ),
)
def test_render_never_changes_the_argv_length(value, command):
    argv = render_argv(tuple(command), {"v": value})
    assert len(argv) == len(command)
    for item, out in zip(command, argv, strict=True):
        expected = item.replace("{v}", "\x01").replace("{{", "{").replace("}}", "}")
        assert out == expected.replace("\x01", value)


# command_values -----------------------------------------------------------------

CONTEXT = {"request_id": 5, "task_id": 6, "attempt": 1, "work_dir": "/w", "python": "/usr/bin/py"}


def test_command_values_offer_params_and_conveyor_context():
    values = command_values({"a": 1}, CONTEXT)
    assert values["a"] == 1
    assert values["conveyor"] == CONTEXT


def test_params_cannot_override_conveyor_values():
    hostile = {"conveyor": {"python": "/tmp/evil", "work_dir": "/"}, "x": 1}
    values = command_values(hostile, CONTEXT)
    argv = render_argv(("{conveyor.python}", "{conveyor.work_dir}", "{x}"), values)
    assert argv == ["/usr/bin/py", "/w", "1"]
    # and the submitted params are left as they were
    assert hostile["conveyor"] == {"python": "/tmp/evil", "work_dir": "/"}


def test_non_object_params_are_offered_as_params():
    values = command_values([1, 2], CONTEXT)
    assert values["params"] == [1, 2]
    assert render_argv(("{conveyor.request_id}",), values) == ["5"]
    assert render_argv(("{params}",), command_values("text", CONTEXT)) == ["text"]


# json_path ---------------------------------------------------------------------------


def test_json_path():
    assert json_path([]) == "$"
    assert json_path(["logs_to_process", 1, "output_dir"]) == "$.logs_to_process[1].output_dir"
    assert json_path([0]) == "$[0]"


# Pipeline.check_params ----------------------------------------------------------------

ITEM_SCHEMA = {
    "type": "object",
    "required": ["rawbinlog_bin", "output_dir"],
    "properties": {
        "rawbinlog_bin": {"type": "string", "minLength": 1},
        "output_dir": {"type": "string", "minLength": 1},
    },
    "additionalProperties": False,
}
SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["logs_to_process"],
    "properties": {
        "logs_to_process": {"type": "array", "minItems": 1, "items": ITEM_SCHEMA},
        "site": {"type": "string"},
    },
    "additionalProperties": False,
}


def spotbot(**kw):
    defaults = dict(
        name="spotbot",
        executor="command",
        command=("{conveyor.python}", "tool", "--bin", "{rawbinlog_bin}", "--out", "{output_dir}"),
        split="logs_to_process",
        schema=SCHEMA,
    )
    defaults.update(kw)
    return Pipeline(**defaults)


def log(name):
    return {"rawbinlog_bin": f"{name}.bin", "output_dir": f"out/{name}"}


def test_check_params_returns_each_tasks_params():
    tasks = spotbot().check_params({"site": "lab", "logs_to_process": [log("a"), log("b")]})
    assert tasks == [{"site": "lab", **log("a")}, {"site": "lab", **log("b")}]


@pytest.mark.parametrize(
    ("params", "path", "words"),
    [
        (
            {"logs_to_process": [log("a"), {**log("b"), "output_dir": ""}]},
            "$.logs_to_process[1].output_dir",
            [],
        ),
        (
            {"logs_to_process": [log("a"), {**log("b"), "output_dir": 5}]},
            "$.logs_to_process[1].output_dir",
            ["string"],
        ),
        (
            # a missing property is named by its own path
            {"logs_to_process": [log("a"), {"rawbinlog_bin": "b.bin"}]},
            "$.logs_to_process[1].output_dir",
            ["output_dir"],
        ),
        (
            {"logs_to_process": [{**log("a"), "extra": 1}]},
            "$.logs_to_process[0]",
            ["extra"],
        ),
        ({"logs_to_process": "a.bin"}, "$.logs_to_process", ["array"]),
        ({}, "$.logs_to_process", ["logs_to_process"]),
        ({"logs_to_process": [log("a")], "bogus": 1}, "$", ["bogus"]),
        ([log("a")], "$", ["object"]),
        ({"logs_to_process": [log("a")], "site": 3}, "$.site", ["string"]),
    ],
)
def test_schema_errors_name_the_failing_field(params, path, words):
    with pytest.raises(ParamsError) as info:
        spotbot().check_params(params)
    err = info.value
    assert err.path == path
    for word in words:
        assert word in err.message
    assert str(err).startswith(f"{path}: ")
    assert isinstance(err, ValueError)


def test_split_errors_point_at_the_split_key():
    pipeline = spotbot(schema=None)
    with pytest.raises(ParamsError) as info:
        pipeline.check_params({"logs_to_process": []})
    assert info.value.path == "$.logs_to_process"
    assert "empty" in info.value.message
    with pytest.raises(ParamsError) as info:
        pipeline.check_params({"other": 1})
    assert info.value.path == "$.logs_to_process"
    with pytest.raises(ParamsError) as info:
        pipeline.check_params({"logs_to_process": {"a": 1}})
    assert info.value.path == "$.logs_to_process"
    assert "array" in info.value.message


def test_command_template_errors_name_the_task_index():
    pipeline = spotbot(schema=None)
    params = {"logs_to_process": [log("a"), log("b"), {"rawbinlog_bin": "c.bin"}]}
    with pytest.raises(ParamsError) as info:
        pipeline.check_params(params)
    assert info.value.path == "$.logs_to_process[2]"
    assert "output_dir" in info.value.message


def test_command_template_non_scalar_value_is_refused_at_submit():
    pipeline = spotbot(schema=None)
    params = {"logs_to_process": [{"rawbinlog_bin": ["a", "b"], "output_dir": "o"}]}
    with pytest.raises(ParamsError) as info:
        pipeline.check_params(params)
    assert info.value.path == "$.logs_to_process[0]"
    assert "rawbinlog_bin" in info.value.message


def test_nul_byte_is_refused_at_submit():
    pipeline = spotbot(schema=None)
    with pytest.raises(ParamsError, match="NUL"):
        pipeline.check_params({"logs_to_process": [{**log("a"), "output_dir": "o\0x"}]})


def test_unsplit_command_pipeline_errors_point_at_the_root():
    pipeline = Pipeline(name="echo", executor="command", command=("echo", "{message}"))
    assert pipeline.check_params({"message": "hi"}) == [{"message": "hi"}]
    with pytest.raises(ParamsError) as info:
        pipeline.check_params({"msg": "hi"})
    assert info.value.path == "$"
    assert "message" in info.value.message


def test_python_pipelines_are_not_checked_against_a_command():
    pipeline = Pipeline(name="noop", executor="python", handler="m:f")
    assert pipeline.check_params({"anything": [1]}) == [{"anything": [1]}]
    assert pipeline.check_params(None) == [None]


def test_conveyor_values_are_always_available_to_templates():
    pipeline = Pipeline(
        name="p",
        executor="command",
        command=(
            "{conveyor.python}",
            "{conveyor.work_dir}",
            "{conveyor.task_id}",
            "{conveyor.request_id}",
            "{conveyor.attempt}",
        ),
    )
    assert pipeline.check_params({}) == [{}]


def test_pipeline_defaults():
    pipeline = Pipeline(name="p", executor="python", handler="m:f")
    assert pipeline.queue == "default"
    assert pipeline.retry.max_attempts == 1
    assert pipeline.concurrency is None
    assert pipeline.timeout is None
    with pytest.raises(AttributeError):
        pipeline.name = "other"  # records are immutable

"""Reading a JSON body strictly: the content type, the JSON itself (no NaN, no
infinities, no lone surrogates: what the databases could not store), then its shape."""

from __future__ import annotations

import json
import math
from email.message import Message
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from conveyor.api.problems import Problem, from_pydantic
from conveyor.jsonvalues import problem_in
from conveyor.pipelines import json_path

_M = TypeVar("_M", bound=BaseModel)


class _NotJSON(ValueError):
    pass


def _constant(name: str) -> Any:
    raise _NotJSON(f"{name} is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotJSON(f"{text} is too large for a JSON number")
    return value


def _int(text: str) -> int:
    # Python converts at most 4,300 digits; no store needs near that many.
    if len(text) > 100:
        raise _NotJSON(f"the integer {text[:24]}... has {len(text.lstrip('-'))} digits")
    return int(text)


def is_json_type(content_type: str | None) -> bool:
    if not content_type:
        return False
    msg = Message()
    msg["content-type"] = content_type
    subtype = msg.get_content_subtype()
    return msg.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


def loads(raw: bytes) -> Any:
    """Parse JSON strictly; raises a 400 problem saying what is wrong and where."""
    if not raw.strip():
        raise Problem(400, "the body is empty: expected JSON", "bad-json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Problem(400, f"the body is not UTF-8 text (byte {exc.start})", "bad-json") from None
    try:
        value = json.loads(text, parse_constant=_constant, parse_float=_float, parse_int=_int)
    except json.JSONDecodeError as exc:
        raise Problem(
            400,
            f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            "bad-json",
        ) from None
    except _NotJSON as exc:
        raise Problem(400, f"the body is not valid JSON: {exc}", "bad-json") from None
    except RecursionError:
        raise Problem(400, "the body is not valid JSON: nested too deeply", "bad-json") from None
    # what parses but no store keeps: a lone surrogate (a "\ud800" escape), say
    found = problem_in(value)
    if found is not None:
        where = json_path(found[0])
        raise Problem(400, f"the body is not valid JSON: {where}: {found[1]}", "bad-json")
    return value


async def read_json(request: Request) -> Any:
    """The request's JSON body; 415 unless it says it is JSON, 400 unless it is."""
    content_type = request.headers.get("content-type")
    if not is_json_type(content_type):
        said = f"got {content_type!r}" if content_type else "no Content-Type was sent"
        raise Problem(415, f"the body must be application/json ({said})", "unsupported-media-type")
    return loads(await request.body())


def parse(model: type[_M], value: Any) -> _M:
    """The body as `model`; a 422 problem naming each failing field otherwise."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise from_pydantic(exc) from None

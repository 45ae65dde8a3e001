"""Configuration: `conveyor.toml`, read once into immutable values.

Where the file lives: `--config`, else `CONVEYOR_CONFIG`, else `./conveyor.toml`; with
none of them, the built-in examples. The database URL: `CONVEYOR_DATABASE_URL`, else
`[conveyor] database`, else `sqlite:///conveyor.db` beside the config file.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from conveyor.hosts import Host
from conveyor.paths import PathRules, SelectorError, parse_selector
from conveyor.pipelines import Pipeline, TemplateError, template_fields
from conveyor.queues import DEFAULT_QUEUE, DEFAULT_QUEUE_ORDER
from conveyor.tasks import RetryPolicy

_HANDLER = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*")


class ConfigError(ValueError):
    pass


class _PipelineModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    executor: Literal["command", "python", "ssh"]
    command: list[str] | None = None
    handler: str | None = None
    split: str | None = None
    schema_: dict[str, Any] | str | None = Field(default=None, alias="schema")
    queue: str = DEFAULT_QUEUE
    priority: int = 0
    timeout: float | None = Field(default=None, gt=0)
    retries: int = Field(default=0, ge=0, le=100)
    backoff: float = Field(default=1.0, ge=0)
    backoff_max: float = Field(default=300.0, ge=0)
    concurrency: int | None = Field(default=None, ge=1)
    cache: float | None = Field(default=None, gt=0)
    env: dict[str, str] = {}
    cwd: str | None = None
    description: str = ""
    hosts: list[str] = []
    paths: list[str] = []
    path_map: dict[str, str] = {}
    roots: list[str] = []

    @field_validator("command")
    @classmethod
    def _argv(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if not v:
                raise ValueError("command must name a program")
            for item in v:
                try:
                    template_fields(item)
                except TemplateError as exc:
                    raise ValueError(str(exc)) from None
        return v


class _HostModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str = Field(min_length=1)
    port: int = Field(default=22, ge=1, le=65535)
    user: str = Field(min_length=1)
    key_file: str | None = None
    known_hosts: str | None = None
    insecure_skip_host_key_check: bool = False
    concurrency: int = Field(default=1, ge=1, le=1024)
    connect_timeout: float = Field(default=10.0, gt=0)
    keepalive_interval: float = Field(default=15.0, gt=0)
    keepalive_count_max: int = Field(default=3, ge=1)
    path_map: dict[str, str] = {}


class _ConveyorModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    database: str | None = None
    artifacts: str | None = None
    queues: list[str] = list(DEFAULT_QUEUE_ORDER)
    lease: float = Field(default=30.0, gt=0)
    poll_interval: float = Field(default=1.0, gt=0)


class _ApiModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    read_open: bool = False
    max_body: int = Field(default=1_048_576, ge=1024, le=1 << 30)
    token_cache: float = Field(default=2.0, ge=0, le=60)


class _LegacyModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    pipeline: str = "spotbot"
    require_token: bool = False


class _FileModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    conveyor: _ConveyorModel = _ConveyorModel()
    api: _ApiModel = _ApiModel()
    legacy: _LegacyModel = _LegacyModel()
    pipelines: dict[str, _PipelineModel] = {}
    hosts: dict[str, _HostModel] = {}


@dataclass(frozen=True)
class ApiSettings:
    """`[api]`: the HTTP API."""

    read_open: bool = False  # reading needs no token (submitting and changing still do)
    max_body: int = 1_048_576  # bytes; a larger request body is refused with 413
    # seconds a checked token is trusted without asking the database again: a revoked
    # token keeps working this long at most (0: ask on every request)
    token_cache: float = 2.0


@dataclass(frozen=True)
class LegacySettings:
    """`[legacy]`: the Spotbot-compatible endpoint."""

    pipeline: str = "spotbot"  # the pipeline its SUBMIT feeds
    require_token: bool = False  # when true, a submit token is needed to use it


@dataclass(frozen=True)
class Config:
    database_url: str
    artifacts_dir: Path
    pipelines: Mapping[str, Pipeline]
    queue_order: tuple[str, ...] = DEFAULT_QUEUE_ORDER
    lease: float = 30.0
    poll_interval: float = 1.0
    source: Path | None = None
    api: ApiSettings = field(default_factory=ApiSettings)
    legacy: LegacySettings = field(default_factory=LegacySettings)
    hosts: Mapping[str, Host] = field(default_factory=dict)


def _load_schema(value: dict[str, Any] | str | None, base: Path, where: str) -> Any:
    if value is None:
        return None
    schema: Any = value
    if isinstance(value, str):
        path = (base / value).resolve()
        try:
            schema = json.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"{where}.schema: cannot read {path}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}.schema: {path} is not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise ConfigError(f"{where}.schema must be a JSON object")
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        raise ConfigError(f"{where}.schema is not a valid JSON Schema: {exc.message}") from None
    return schema


def _host(name: str, m: _HostModel, base: Path) -> Host:
    def file(value: str | None) -> str | None:
        return str((base / Path(value).expanduser()).resolve()) if value else None

    return Host(
        name=name,
        address=m.address,
        user=m.user,
        port=m.port,
        key_file=file(m.key_file),
        known_hosts=file(m.known_hosts),
        insecure_skip_host_key_check=m.insecure_skip_host_key_check,
        concurrency=m.concurrency,
        connect_timeout=m.connect_timeout,
        keepalive_interval=m.keepalive_interval,
        keepalive_count_max=m.keepalive_count_max,
        path_map=tuple(m.path_map.items()),
    )


def _path_rules(where: str, m: _PipelineModel) -> PathRules:
    try:
        fields = tuple(parse_selector(s) for s in m.paths)
    except SelectorError as exc:
        raise ConfigError(f"{where}.paths: {exc}") from None
    if fields and not m.roots:
        raise ConfigError(f"{where}: paths are declared but no roots = [...] allow any")
    for root in m.roots:
        if not root.startswith("/"):
            raise ConfigError(f"{where}.roots: {root!r} is not an absolute path")
    return PathRules(path_map=tuple(m.path_map.items()), roots=tuple(m.roots), fields=fields)


def _pipeline(name: str, m: _PipelineModel, base: Path, hosts: Mapping[str, Host]) -> Pipeline:
    where = f"pipelines.{name}"
    if m.executor in ("command", "ssh") and not m.command:
        raise ConfigError(f"{where}: executor '{m.executor}' needs command = [argv...]")
    if m.executor == "ssh" and not m.hosts:
        raise ConfigError(f"{where}: executor 'ssh' needs hosts = [\"name\", ...]")
    for host in m.hosts:
        if host not in hosts:
            raise ConfigError(
                f"{where}.hosts: no [hosts.{host}] is configured "
                f"(known: {', '.join(sorted(hosts)) or 'none'})"
            )
    if m.executor == "python" and not m.handler:
        raise ConfigError(f"{where}: executor 'python' needs handler = 'module:function'")
    if m.handler is not None and not _HANDLER.fullmatch(m.handler):
        raise ConfigError(f"{where}.handler: expected 'module:function', got {m.handler!r}")
    return Pipeline(
        name=name,
        executor=m.executor,
        command=tuple(m.command or ()),
        handler=m.handler,
        split=m.split,
        schema=_load_schema(m.schema_, base, where),
        queue=m.queue,
        priority=m.priority,
        timeout=m.timeout,
        retry=RetryPolicy(retries=m.retries, backoff_base=m.backoff, backoff_max=m.backoff_max),
        concurrency=m.concurrency,
        cache=m.cache,
        env=dict(m.env),
        cwd=(m.cwd if m.executor == "ssh" else str((base / m.cwd).resolve())) if m.cwd else None,
        description=m.description,
        hosts=tuple(hosts[h] for h in m.hosts),
        paths=_path_rules(where, m),
    )


def parse_config(
    data: Mapping[str, Any],
    base: Path,
    env: Mapping[str, str],
    source: Path | None = None,
    data_dir: Path | None = None,
) -> Config:
    try:
        model = _FileModel.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{loc}: {err['msg']}") from None
    hosts = {name: _host(name, m, base) for name, m in model.hosts.items()}
    pipelines = {name: _pipeline(name, m, base, hosts) for name, m in model.pipelines.items()}
    if "pipeline" in model.legacy.model_fields_set and model.legacy.pipeline not in pipelines:
        raise ConfigError(
            f"legacy.pipeline: no pipeline {model.legacy.pipeline!r} is configured "
            f"(known: {', '.join(sorted(pipelines)) or 'none'})"
        )
    data_dir = data_dir or base
    database = env.get("CONVEYOR_DATABASE_URL") or model.conveyor.database
    if not database:
        database = f"sqlite:///{(data_dir / 'conveyor.db').resolve()}"
    artifacts = env.get("CONVEYOR_ARTIFACTS") or model.conveyor.artifacts or "artifacts"
    return Config(
        database_url=database,
        artifacts_dir=(data_dir / artifacts).resolve(),
        pipelines=pipelines,
        queue_order=tuple(model.conveyor.queues),
        lease=model.conveyor.lease,
        poll_interval=model.conveyor.poll_interval,
        source=source,
        api=ApiSettings(
            read_open=model.api.read_open,
            max_body=model.api.max_body,
            token_cache=model.api.token_cache,
        ),
        legacy=LegacySettings(
            pipeline=model.legacy.pipeline, require_token=model.legacy.require_token
        ),
        hosts=hosts,
    )


def builtin_config_path() -> Path:
    return Path(__file__).parent / "examples" / "conveyor.toml"


def load_config(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Config:
    """Read the config file; with no file named or found, the built-in examples, with
    their database and artifacts in the current directory."""
    env = os.environ if env is None else env
    named = path or env.get("CONVEYOR_CONFIG")
    if named:
        file = Path(named)
        if not file.is_file():
            raise ConfigError(f"config file not found: {file}")
    else:
        file = Path("conveyor.toml")
        if not file.is_file():
            return _read(builtin_config_path(), env, base=Path.cwd())
    return _read(file, env, base=file.resolve().parent)


def _read(file: Path, env: Mapping[str, str], base: Path) -> Config:
    try:
        data = tomllib.loads(file.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {file}: {exc.strerror}") from None
    # The built-in examples name files beside themselves, but keep their database and
    # artifacts in the current directory.
    return parse_config(data, file.resolve().parent, env, source=file, data_dir=base)

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from conveyor.artifacts import ArtifactError, is_file_url, local_store_path
from conveyor.artifacts.keys import DEFAULT_KEY_TEMPLATE, ArtifactKeyError, check_template
from conveyor.hosts import Host
from conveyor.ingest.loader import LoadError, SqliteLoad, read_mapping
from conveyor.ingest.settings import (
    SinkConfig,
    SinkModel,
    SpoolConfig,
    SpoolModel,
    sink_config,
    spool_config,
)
from conveyor.notifications import NotifySettings
from conveyor.paths import PathRules, SelectorError, parse_selector
from conveyor.pipelines import TASK_VARIABLES, Pipeline, TemplateError, template_fields
from conveyor.queues import DEFAULT_QUEUE, DEFAULT_QUEUE_ORDER
from conveyor.retention import AgeError, parse_age
from conveyor.tasks import RetryPolicy

_HANDLER = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*")


class ConfigError(ValueError):
    pass


# Every table of the config: unknown keys are errors, and numbers are finite (`inf` is
# valid TOML, and a timeout of `inf` is no timeout a clock can reach).
_STRICT = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class _LoadSqliteModel(BaseModel):
    model_config = _STRICT

    file: str
    mapping: str
    database: str | None = None


class _NotifyModel(BaseModel):
    model_config = _STRICT

    webhook: str = Field(pattern=r"^https?://[^\s/]+")
    on: list[Literal["task", "request"]] = Field(default=["task", "request"], min_length=1)
    secret_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    timeout: float = Field(default=10.0, gt=0, le=300)
    retries: int = Field(default=8, ge=0, le=100)
    backoff: float = Field(default=2.0, ge=0)
    backoff_max: float = Field(default=600.0, ge=0)


_PIPELINE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _check_glob(pattern: str) -> str:
    if not pattern or pattern.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", pattern):
        raise ValueError(f"output glob {pattern!r} must be relative to the work dir")
    if ".." in re.split(r"[/\\]", pattern):
        raise ValueError(f"output glob {pattern!r} must not climb out with '..'")
    return pattern


class _PipelineModel(BaseModel):
    model_config = _STRICT

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
    # false: a command that needs no folder of its own (see Pipeline.work_dir)
    work_dir: bool = True
    description: str = ""
    outputs: list[str] = []
    notify: _NotifyModel | None = None

    @field_validator("outputs")
    @classmethod
    def _globs(cls, v: list[str]) -> list[str]:
        return [_check_glob(p) for p in v]

    @field_validator("env")
    @classmethod
    def _environment(cls, v: dict[str, str]) -> dict[str, str]:
        # What a process's environment cannot hold: execve would refuse it, or read
        # another variable than the one written.
        for name, value in v.items():
            if not name or "=" in name or "\0" in name:
                raise ValueError(f"{name!r} is not a variable name (empty, '=' or NUL)")
            if "\0" in value:
                raise ValueError(f"the value of {name} holds a NUL character")
            if name in TASK_VARIABLES:
                raise ValueError(f"{name} is set by Conveyor for each attempt")
        return v

    load_sqlite: _LoadSqliteModel | None = None
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
                if "\0" in item:
                    raise ValueError(f"command item {item!r} holds a NUL character")
                try:
                    template_fields(item)
                except TemplateError as exc:
                    raise ValueError(str(exc)) from None
        return v


class _HostModel(BaseModel):
    model_config = _STRICT

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
    model_config = _STRICT

    database: str | None = None
    artifacts: str | None = None
    queues: list[str] = list(DEFAULT_QUEUE_ORDER)
    lease: float = Field(default=30.0, gt=0)
    poll_interval: float = Field(default=1.0, gt=0)
    # How long finished requests are kept ("30d", "12h", or days); none: for ever.
    retention: str | float | None = None

    @field_validator("retention")
    @classmethod
    def _retention(cls, v: str | float | None) -> str | float | None:
        if v is not None:
            try:
                parse_age(v)
            except AgeError as exc:
                raise ValueError(str(exc)) from None
        return v


class _ArtifactsModel(BaseModel):
    model_config = _STRICT

    url: str | None = None
    key: str = DEFAULT_KEY_TEMPLATE
    endpoint_url: str | None = Field(default=None, pattern=r"^https?://[^\s/]+")
    region: str | None = None
    profile: str | None = None
    timeout: float = Field(default=30.0, gt=0, le=3600)
    retries: int = Field(default=3, ge=0, le=20)
    presign: float = Field(default=0, ge=0, le=7 * 86400)
    upload_logs: bool | None = None
    max_files: int = Field(default=1000, ge=1, le=1_000_000)

    @field_validator("key")
    @classmethod
    def _key(cls, v: str) -> str:
        try:
            check_template(v)
        except ArtifactKeyError as exc:
            raise ValueError(str(exc)) from None
        return v


class _ApiModel(BaseModel):
    model_config = _STRICT

    read_open: bool = False
    max_body: int = Field(default=1_048_576, ge=1024, le=1 << 30)
    token_cache: float = Field(default=2.0, ge=0, le=60)


class _DashboardModel(BaseModel):
    model_config = _STRICT

    secret_file: str | None = None
    session_hours: float = Field(default=12.0, gt=0, le=24 * 90)
    refresh: float = Field(default=2.0, ge=0.5, le=2.0)
    stats_cache: float = Field(default=5.0, ge=0, le=300)


class _MetricsModel(BaseModel):
    model_config = _STRICT

    public: bool = False
    cache: float = Field(default=5.0, ge=0, le=300)


class _LegacyModel(BaseModel):
    model_config = _STRICT

    pipeline: str = "spotbot"
    require_token: bool = False


class _FileModel(BaseModel):
    model_config = _STRICT

    conveyor: _ConveyorModel = _ConveyorModel()
    api: _ApiModel = _ApiModel()
    legacy: _LegacyModel = _LegacyModel()
    dashboard: _DashboardModel = _DashboardModel()
    metrics: _MetricsModel = _MetricsModel()
    artifacts: _ArtifactsModel = _ArtifactsModel()
    pipelines: dict[str, _PipelineModel] = {}
    spools: dict[str, SpoolModel] = {}
    sinks: dict[str, SinkModel] = {}
    hosts: dict[str, _HostModel] = {}

    @field_validator("pipelines")
    @classmethod
    def _pipeline_names(cls, value: dict[str, _PipelineModel]) -> dict[str, _PipelineModel]:
        # Names go into URLs, metrics labels and artifact keys (`{pipeline}`), where a
        # slash or a space would change what they say.
        for name in value:
            if not _PIPELINE_NAME.fullmatch(name):
                raise ValueError(
                    f"pipeline name {name!r}: letters, digits, '_', '-' and '.' only, "
                    "starting with a letter or digit"
                )
        return value


@dataclass(frozen=True)
class ApiSettings:
    """`[api]`: the HTTP API."""

    read_open: bool = False  # reading needs no token (submitting and changing still do)
    max_body: int = 1_048_576  # bytes; a larger request body is refused with 413
    # seconds a checked token is trusted without asking the database again: a revoked
    # token keeps working this long at most (0: ask on every request)
    token_cache: float = 2.0


@dataclass(frozen=True)
class DashboardSettings:
    """`[dashboard]`: the web dashboard at `/`."""

    # the key that signs session cookies: $CONVEYOR_DASHBOARD_SECRET, else this file,
    # made (random, mode 0600) on first use; None: `dashboard.secret` in the artifacts
    secret_file: Path | None = None
    session_hours: float = 12.0  # a login lasts this long
    refresh: float = 2.0  # seconds between live updates of a page (at most 2)
    # seconds the throughput charts' aggregate may be reused (0: query every time)
    stats_cache: float = 5.0


@dataclass(frozen=True)
class MetricsSettings:
    """`[metrics]`: the Prometheus endpoint `/metrics`."""

    public: bool = False  # true: scraping needs no token (else a read token, or read_open)
    cache: float = 5.0  # seconds the database figures may be reused between scrapes


@dataclass(frozen=True)
class LegacySettings:
    """`[legacy]`: the Spotbot-compatible endpoint."""

    pipeline: str = "spotbot"  # the pipeline its SUBMIT feeds
    require_token: bool = False  # when true, a submit token is needed to use it


@dataclass(frozen=True)
class ArtifactSettings:
    """`[artifacts]`: where outputs (and, for a remote store, logs) are kept."""

    url: str  # s3://bucket/prefix, or a local directory
    key: str = DEFAULT_KEY_TEMPLATE  # the key template of each artifact
    endpoint_url: str | None = None  # an S3-compatible endpoint other than AWS
    region: str | None = None
    profile: str | None = None  # a named AWS profile for the credentials
    timeout: float = 30.0  # seconds for each connect and each read
    retries: int = 3  # more tries of a failing call, with exponential back-off
    presign: float = 0.0  # seconds a download link lasts; 0: the API streams downloads
    upload_logs: bool | None = None  # None: upload logs when the store is remote
    max_files: int = 1000  # most output files of one attempt


@dataclass(frozen=True)
class Config:
    database_url: str
    artifacts_dir: Path
    pipelines: Mapping[str, Pipeline]
    queue_order: tuple[str, ...] = DEFAULT_QUEUE_ORDER
    lease: float = 30.0
    poll_interval: float = 1.0
    retention: float | None = None  # seconds finished requests are kept; None: for ever
    source: Path | None = None
    api: ApiSettings = field(default_factory=ApiSettings)
    legacy: LegacySettings = field(default_factory=LegacySettings)
    dashboard: DashboardSettings = field(default_factory=DashboardSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    artifacts: ArtifactSettings | None = None
    spools: Mapping[str, SpoolConfig] = field(default_factory=dict)
    sinks: Mapping[str, SinkConfig] = field(default_factory=dict)
    hosts: Mapping[str, Host] = field(default_factory=dict)

    @property
    def artifact_settings(self) -> ArtifactSettings:
        """The artifact store's settings; by default a directory beside the logs."""
        return self.artifacts or ArtifactSettings(url=str(self.artifacts_dir / "objects"))


def _notify(m: _NotifyModel | None) -> NotifySettings | None:
    if m is None:
        return None
    return NotifySettings(
        webhook=m.webhook,
        on=frozenset(m.on),
        secret_env=m.secret_env,
        timeout=m.timeout,
        retry=RetryPolicy(retries=m.retries, backoff_base=m.backoff, backoff_max=m.backoff_max),
    )


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
    if not m.work_dir:
        _check_no_work_dir(where, m)
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
        work_dir=m.work_dir,
        description=m.description,
        outputs=tuple(m.outputs),
        notify=_notify(m.notify),
        load_sqlite=_load_sqlite(m.load_sqlite, base, where, m.roots),
        hosts=tuple(hosts[h] for h in m.hosts),
        paths=_path_rules(where, m),
    )


def _check_no_work_dir(where: str, m: _PipelineModel) -> None:
    """`work_dir = false`: what would need the work directory is refused, by name."""
    if m.executor != "command":
        raise ConfigError(
            f"{where}.work_dir: only executor 'command' can go without a work directory "
            f"(a 'python' handler makes its own only when it asks for it, and an 'ssh' "
            f"command has none on the worker)"
        )
    if m.outputs:
        raise ConfigError(
            f"{where}.outputs: outputs are collected from the task's work directory, "
            f"and work_dir = false"
        )
    named = [("command", item) for item in m.command or ()]
    if m.load_sqlite is not None:
        named.append(("load_sqlite.file", m.load_sqlite.file))
    for key, template in named:
        try:
            fields = template_fields(template)
        except TemplateError:
            continue  # said when the template itself is checked
        if "conveyor.work_dir" in fields:
            raise ConfigError(
                f"{where}.{key}: {{conveyor.work_dir}} names the task's work directory, "
                f"and work_dir = false"
            )
    if m.load_sqlite is not None and not m.load_sqlite.file.startswith(("/", "{")):
        raise ConfigError(
            f"{where}.load_sqlite.file: {m.load_sqlite.file!r} is a relative path, found "
            f"in the task's work directory, and work_dir = false"
        )


def _load_sqlite(
    m: _LoadSqliteModel | None, base: Path, where: str, roots: Sequence[str] = ()
) -> SqliteLoad | None:
    if m is None:
        return None
    try:
        template_fields(m.file)
        mapping = read_mapping((base / m.mapping).resolve())
    except (TemplateError, LoadError) as exc:
        raise ConfigError(f"{where}.load_sqlite: {exc}") from None
    return SqliteLoad(file=m.file, mapping=mapping, database=m.database, roots=tuple(roots))


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
    try:
        sinks = {name: sink_config(name, m, base) for name, m in model.sinks.items()}
        spools = {name: spool_config(name, m, base) for name, m in model.spools.items()}
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for name, spool in spools.items():
        if spool.sink not in sinks and spool.sink != "kcidb":
            raise ConfigError(
                f"spools.{name}.sink: no sink {spool.sink!r} is configured "
                f"(known: {', '.join(sorted({*sinks, 'kcidb'}))})"
            )
    database = env.get("CONVEYOR_DATABASE_URL") or model.conveyor.database
    if not database:
        database = f"sqlite:///{(data_dir / 'conveyor.db').resolve()}"
    artifacts = env.get("CONVEYOR_ARTIFACTS") or model.conveyor.artifacts or "artifacts"
    artifacts_dir = (data_dir / artifacts).resolve()
    a = model.artifacts
    store_url = env.get("CONVEYOR_ARTIFACTS_URL") or a.url or str(artifacts_dir / "objects")
    if is_file_url(store_url):
        try:
            local_store_path(store_url)
        except ArtifactError as exc:
            raise ConfigError(f"artifacts.url: {exc}") from exc
    elif "://" not in store_url:
        store_url = str((data_dir / store_url).resolve())
    elif not store_url.startswith("s3://"):
        raise ConfigError(f"artifacts.url: use s3://bucket/prefix or a directory, not {store_url}")
    return Config(
        database_url=database,
        artifacts_dir=artifacts_dir,
        pipelines=pipelines,
        queue_order=tuple(model.conveyor.queues),
        lease=model.conveyor.lease,
        poll_interval=model.conveyor.poll_interval,
        retention=(
            None if model.conveyor.retention is None else parse_age(model.conveyor.retention)
        ),
        source=source,
        api=ApiSettings(
            read_open=model.api.read_open,
            max_body=model.api.max_body,
            token_cache=model.api.token_cache,
        ),
        legacy=LegacySettings(
            pipeline=model.legacy.pipeline, require_token=model.legacy.require_token
        ),
        dashboard=DashboardSettings(
            secret_file=(
                (base / model.dashboard.secret_file).resolve()
                if model.dashboard.secret_file
                else None
            ),
            session_hours=model.dashboard.session_hours,
            refresh=model.dashboard.refresh,
            stats_cache=model.dashboard.stats_cache,
        ),
        metrics=MetricsSettings(public=model.metrics.public, cache=model.metrics.cache),
        artifacts=ArtifactSettings(
            url=store_url,
            key=a.key,
            endpoint_url=env.get("CONVEYOR_ARTIFACTS_ENDPOINT") or a.endpoint_url,
            region=a.region,
            profile=a.profile,
            timeout=a.timeout,
            retries=a.retries,
            presign=a.presign,
            upload_logs=a.upload_logs,
            max_files=a.max_files,
        ),
        spools=spools,
        sinks=sinks,
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

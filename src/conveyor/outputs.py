"""Outputs: after an attempt, the files matching its pipeline's `outputs` globs go to the
artifact store and are recorded as the task's artifacts (and, where the store is remote,
the attempt's log too). Runs in the attempt's own thread, so uploads never hold up
claiming; every upload is bounded by the store's timeouts and retries, and one that
keeps failing fails the attempt (retried per the pipeline's policy) with the reason."""

from __future__ import annotations

import logging
import mimetypes
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from conveyor.artifacts import (
    Artifact,
    ArtifactError,
    ArtifactKind,
    ArtifactRef,
    ArtifactStore,
    is_remote_url,
)
from conveyor.artifacts.keys import ArtifactKeyError, render_key
from conveyor.config import ArtifactSettings
from conveyor.executors import ExecResult, TaskContext
from conveyor.pipelines import Pipeline
from conveyor.store import Store, Unavailable
from conveyor.tasks import Task

log = logging.getLogger(__name__)

LOG_PREFIX = "logs/"  # where logs go in the key's {name}, apart from the outputs


# an attempt's log, kept beside the outputs (`LOG_PREFIX`): no output may take its key
_LOG_NAME = re.compile(re.escape(LOG_PREFIX) + r"attempt-[0-9]+\.log")


@dataclass(frozen=True)
class Found:
    files: list[tuple[str, Path]]  # (name relative to the work dir, path)
    skipped: list[str]  # why some matches were left out


def collect_outputs(work_dir: Path, patterns: Sequence[str], limit: int) -> Found:
    """The regular files under `work_dir` matching any of the globs, each once, in name
    order. A match that resolves outside the work dir (a symlink out of it) is left out
    and said so: outputs never carry other files off the machine."""
    root = work_dir.resolve()
    seen: dict[str, Path] = {}
    refused: set[str] = set()
    skipped: list[str] = []
    for pattern in patterns:
        for path in sorted(work_dir.glob(pattern)):
            name = path.relative_to(work_dir).as_posix()
            if name in seen or name in refused or not path.is_file():
                continue
            real = path.resolve()
            if not real.is_relative_to(root):
                refused.add(name)
                skipped.append(f"{name}: leads outside the work dir")
                continue
            seen[name] = real
    names = sorted(seen)
    if len(names) > limit:
        skipped.append(f"{len(names) - limit} more files than the limit of {limit}")
        names = names[:limit]
    return Found([(n, seen[n]) for n in names], skipped)


class Publisher:
    def __init__(
        self,
        store: Callable[[], ArtifactStore],
        records: Store,
        settings: ArtifactSettings,
        clock: Callable[[], float],
    ) -> None:
        self._store = store  # opened on first use: most attempts keep nothing
        self.records = records
        self.settings = settings
        self.clock = clock

    def _upload_logs(self) -> bool:
        if self.settings.upload_logs is not None:
            return self.settings.upload_logs
        url = self.settings.url
        return is_remote_url(url)

    def _key(self, task: Task, name: str) -> str:
        return render_key(
            self.settings.key,
            pipeline=task.pipeline,
            request_id=task.request_id,
            task_id=task.id,
            attempt=task.attempts,
            name=name,
            created_at=task.created_at,
        )

    def _put(self, task: Task, name: str, path: Path, kind: ArtifactKind) -> Artifact:
        store_name = LOG_PREFIX + name if kind == ArtifactKind.LOG else name
        ctype = "text/plain" if kind == ArtifactKind.LOG else mimetypes.guess_type(name)[0]
        ref: ArtifactRef = self._store().put_file(self._key(task, store_name), path, ctype)
        return Artifact(
            task_id=task.id,
            request_id=task.request_id,
            attempt=task.attempts,
            kind=kind,
            name=name,
            key=ref.key,
            url=ref.url,
            size=ref.size,
            sha256=ref.sha256,
            created_at=self.clock(),
        )

    def wanted(self, pipeline: Pipeline) -> bool:
        return bool(pipeline.outputs) or self._upload_logs()

    def before_attempt(self, pipeline: Pipeline, ctx: TaskContext) -> None:
        """Remove what an earlier attempt left matching the outputs globs: an attempt's
        outputs are the files it wrote itself (the rest of the work dir stays)."""
        if not pipeline.outputs or ctx.attempt <= 1:
            return
        found = collect_outputs(ctx.work_dir, pipeline.outputs, limit=1_000_000)
        for name, path in found.files:
            path.unlink(missing_ok=True)
            ctx.log(f"conveyor: removed {name}, left by an earlier attempt")

    def after_attempt(self, pipeline: Pipeline, ctx: TaskContext, result: ExecResult) -> ExecResult:
        """Keep the attempt's outputs and log; the result, or why keeping them failed."""
        task = ctx.task
        kept: list[Artifact] = []
        if result.ok and pipeline.outputs and ctx.stopping:
            # stopped (its time up, say) after its command succeeded, before its
            # outputs were kept: not a success without them
            result = ctx.stopped_before("its outputs were kept")
        elif result.ok and pipeline.outputs:
            try:
                self._outputs(pipeline, ctx, kept)
            except (ArtifactError, ArtifactKeyError, OSError) as exc:
                # What was uploaded is still recorded: with a template without
                # {attempt}, it replaced an earlier attempt's object under that key.
                ctx.log(f"conveyor: keeping outputs failed: {exc}")
                result = ExecResult(ok=False, error=f"keeping outputs failed: {exc}")
        ctx.close()
        log_file = ctx.log_path
        # The log of an attempt that ran out of time is kept too: it is the one most
        # looked at. (Cancelled, or its worker stopping: not waited for.)
        if self._upload_logs() and log_file.is_file() and (not ctx.stopping or ctx.timed_out):
            try:
                name = f"attempt-{task.attempts}.log"  # the file's own name says its task too
                kept.append(self._put(task, name, log_file, ArtifactKind.LOG))
            except (ArtifactError, ArtifactKeyError) as exc:
                if result.ok:
                    result = ExecResult(ok=False, error=f"uploading the log failed: {exc}")
                else:  # the attempt's own failure is what it reports; this is said here
                    log.warning("task %s: uploading its log failed: %s", task.id, exc)
        if kept:
            try:
                self.records.record_artifacts(kept)
            except Unavailable as exc:
                if result.ok:
                    result = ExecResult(ok=False, error=f"recording outputs failed: {exc}")
        return result

    def _outputs(self, pipeline: Pipeline, ctx: TaskContext, kept: list[Artifact]) -> None:
        """Upload the attempt's outputs, each added to `kept` once it is in the store."""
        found = collect_outputs(ctx.work_dir, pipeline.outputs, self.settings.max_files)
        for note in found.skipped:
            ctx.log(f"conveyor: output skipped: {note}")
        for name, path in found.files:
            if _LOG_NAME.fullmatch(name) and self._upload_logs():
                ctx.log(f"conveyor: output skipped: {name} is where an attempt's log is kept")
                continue
            if ctx.stopping:
                raise ArtifactError(f"stopped while uploading ({ctx.stop_reason})")
            artifact = self._put(ctx.task, name, path, ArtifactKind.OUTPUT)
            ctx.log(f"conveyor: kept {name} ({artifact.size} bytes) as {artifact.url}")
            kept.append(artifact)
        if not found.files:
            ctx.log(f"conveyor: no file matched the outputs {list(pipeline.outputs)}")

"""Large text fields moved out of the rows: stored once by content hash in a blob store
(the artifact store: a directory, or S3) and replaced by a link. The upload has a
time-out (a hung store never stalls the ingester: the file stays pending and is tried
again), and a bounded cache remembers what is already stored."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Protocol

from conveyor.artifacts.errors import ArtifactError


class BlobStore(Protocol):
    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str:
        """Store `data` under `key`; the URL it can be read from."""

    def exists(self, key: str) -> bool: ...


class OffloadUnavailable(RuntimeError):
    """The blob store did not answer in time or failed: try the file again later."""


@dataclass(frozen=True)
class BlobSpec:
    """Which blob store, in a form worker processes can be sent and open themselves:
    the artifact store's URL (`s3://bucket/prefix` or a directory) and its settings."""

    url: str
    timeout: float = 30.0
    retries: int = 3
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None


def open_blob_store(spec: BlobSpec) -> BlobStore:
    from conveyor.artifacts import open_artifact_store

    return open_artifact_store(
        spec.url,
        timeout=spec.timeout,
        retries=spec.retries,
        endpoint_url=spec.endpoint_url,
        region=spec.region,
        profile=spec.profile,
    )


class _Lru:
    def __init__(self, size: int) -> None:
        self.size = size
        self._d: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self._lock:
            found = self._d.get(key)
            if found is not None:
                self._d.move_to_end(key)
            return found

    def put(self, key: str, value: str) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.size:
                self._d.popitem(last=False)


def text_key(text: bytes) -> str:
    digest = hashlib.sha256(text).hexdigest()
    return f"ingest/text/{digest[:2]}/{digest}.txt"


class Offloader:
    def __init__(
        self,
        store: BlobStore,
        threshold: int = 256,
        fields: Iterable[str] = ("log_excerpt",),
        cache_size: int = 100_000,
        timeout: float = 10.0,
    ) -> None:
        self.store = store
        self.threshold = threshold
        self.fields = frozenset(fields)
        self.any_field = "*" in self.fields
        self.cache = _Lru(cache_size)
        self.timeout = timeout
        # Uploads run here so a hung one can be abandoned after the time-out.
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="offload")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __call__(self, doc: Any, shallow: bool = False) -> int:
        """Replace every long text field in place by its link; the number replaced.
        `shallow`: only in the objects of the document's lists (where KCIDB keeps its
        log excerpts), which is much quicker than walking everything."""
        moved = 0
        if shallow and not self.any_field and isinstance(doc, dict):
            for objs in doc.values():
                if not isinstance(objs, list):
                    continue
                for obj in objs:
                    if not isinstance(obj, dict):
                        continue
                    for key in self.fields:
                        value = obj.get(key)
                        if isinstance(value, str) and len(value) > self.threshold:
                            obj[key] = self.link(value)
                            moved += 1
            return moved
        stack = [doc]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                for key, value in node.items():
                    if isinstance(value, str):
                        if (self.any_field or key in self.fields) and len(value) > self.threshold:
                            node[key] = self.link(value)
                            moved += 1
                    elif isinstance(value, dict | list):
                        stack.append(value)
            elif isinstance(node, list):
                stack.extend(v for v in node if isinstance(v, dict | list))
        return moved

    def link(self, text: str) -> str:
        data = text.encode()
        key = text_key(data)
        url = self.cache.get(key)
        if url is None:
            future = self._pool.submit(self.store.put_bytes, key, data, "text/plain; charset=utf-8")
            try:
                url = future.result(timeout=self.timeout)
            except FutureTimeout:
                raise OffloadUnavailable(
                    f"blob store did not store {key} within {self.timeout:g}s"
                ) from None
            except (ArtifactError, OSError) as exc:
                raise OffloadUnavailable(f"blob store failed to store {key}: {exc}") from None
            self.cache.put(key, url)
        return url

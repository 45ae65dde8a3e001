"""The artifact store on any S3-compatible endpoint (AWS S3, MinIO, Ceph, moto...).

Built on boto3 rather than s3fs/fsspec: botocore's `Config` gives explicit connect and
read timeouts and a bounded retry policy with exponential back-off for every call, which
is what keeps a stalled endpoint from hanging a worker (an upload without a time limit
once stalled an ingester for hours); s3fs hides those behind aiohttp and its own
retry loop. boto3 also makes presigned download links. Credentials come from boto3's
usual chain: `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`), a
named profile, or the machine's role; never from Conveyor's config file.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions as bce
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from conveyor.artifacts import ArtifactError, ArtifactMissing, ArtifactRef, Readable
from conveyor.artifacts.keys import check_key
from conveyor.artifacts.local import file_digest

# Larger files go up in parts (each part retried on its own); one thread per upload,
# since the worker already runs attempts side by side.
_TRANSFER = TransferConfig(multipart_threshold=64 * 1024 * 1024, use_threads=False)


def split_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix/")."""
    rest = url.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ArtifactError(f"artifact store URL {url!r} names no bucket")
    prefix = prefix.strip("/")
    if prefix:
        check_key(prefix, what="artifact store prefix")
    return bucket, f"{prefix}/" if prefix else ""


class S3Store:
    remote = True

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
    ) -> None:
        self.bucket, self.prefix = split_s3_url(url)
        self.location = f"s3://{self.bucket}/{self.prefix}"
        self.timeout = timeout
        self.retries = retries
        self._endpoint = endpoint_url
        self._region = region
        self._profile = profile
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        """Made on first use (and shared: boto3 clients are thread-safe)."""
        with self._lock:
            if self._client is None:
                try:
                    session = boto3.session.Session(
                        profile_name=self._profile, region_name=self._region
                    )
                    self._client = session.client(
                        "s3",
                        endpoint_url=self._endpoint,
                        config=Config(
                            connect_timeout=self.timeout,
                            read_timeout=self.timeout,
                            retries={"total_max_attempts": self.retries + 1, "mode": "standard"},
                            signature_version="s3v4",
                            # custom endpoints (MinIO, moto) rarely resolve bucket subdomains
                            s3={"addressing_style": "path" if self._endpoint else "auto"},
                        ),
                    )
                except bce.BotoCoreError as exc:
                    raise ArtifactError(f"cannot use {self.location}: {exc}") from None
            return self._client

    def _object(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _fail(self, doing: str, key: str, exc: Exception) -> ArtifactError:
        where = f"{doing} {self.url(key)}"
        tries = f"{self.retries + 1} attempt{'s' if self.retries else ''}"
        if isinstance(exc, bce.ReadTimeoutError | bce.ConnectTimeoutError):
            return ArtifactError(
                f"{where}: the endpoint did not answer within {self.timeout:g}s ({tries})"
            )
        if isinstance(exc, bce.EndpointConnectionError):
            return ArtifactError(f"{where}: cannot connect to {exc.kwargs.get('endpoint_url')}")
        if isinstance(exc, bce.NoCredentialsError):
            return ArtifactError(
                f"{where}: no S3 credentials (set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or [artifacts] profile)"
            )
        if isinstance(exc, bce.ClientError):
            err = exc.response.get("Error", {})
            code = err.get("Code", "error")
            if code in ("NoSuchKey", "404", "NotFound"):
                return ArtifactMissing(f"no artifact {self.url(key)}")
            return ArtifactError(f"{where}: {code}: {err.get('Message') or exc}")
        return ArtifactError(f"{where}: {exc}")

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str:
        extra = {"ContentType": content_type} if content_type else {}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._object(key), Body=data, **extra)
        except (bce.BotoCoreError, bce.ClientError) as exc:
            raise self._fail("uploading to", key, exc) from None
        return self.url(key)

    def put_file(self, key: str, path: Path, content_type: str | None = None) -> ArtifactRef:
        size, sha = file_digest(path)
        extra: dict[str, Any] = {"Metadata": {"sha256": sha}}
        if content_type:
            extra["ContentType"] = content_type
        try:
            self.client.upload_file(
                str(path), self.bucket, self._object(key), ExtraArgs=extra, Config=_TRANSFER
            )
        except (bce.BotoCoreError, bce.ClientError) as exc:
            raise self._fail("uploading to", key, exc) from None
        except Exception as exc:  # s3transfer wraps failures in its own errors
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, bce.BotoCoreError | bce.ClientError):
                raise self._fail("uploading to", key, cause) from None
            raise ArtifactError(f"uploading to {self.url(key)}: {exc}") from None
        return ArtifactRef(key=key, url=self.url(key), size=size, sha256=sha)

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._object(key))
        except bce.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._fail("looking up", key, exc) from None
        except bce.BotoCoreError as exc:
            raise self._fail("looking up", key, exc) from None
        return True

    def open(self, key: str) -> Readable:
        try:
            body: Readable = self.client.get_object(Bucket=self.bucket, Key=self._object(key))[
                "Body"
            ]
        except (bce.BotoCoreError, bce.ClientError) as exc:
            raise self._fail("downloading", key, exc) from None
        return body

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._object(key)}"

    def link(self, key: str, expires: float) -> str | None:
        try:
            link: str = self.client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": self._object(key)},
                ExpiresIn=max(1, int(expires)),
            )
        except (bce.BotoCoreError, bce.ClientError) as exc:
            raise self._fail("signing a link to", key, exc) from None
        return link

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._object(key))
        except (bce.BotoCoreError, bce.ClientError) as exc:
            raise self._fail("deleting", key, exc) from None

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

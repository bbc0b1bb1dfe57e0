"""Artifact storage shared by the API and the workers: uploaded datasets, adapters, reports, plots.

One small interface (:class:`Storage`) with two backends: :class:`LocalStorage` (a directory; the embedded
default) and :class:`S3Storage` (any S3-compatible store: AWS, MinIO, Ceph). :func:`storage_from_url` picks one
from ``PFLAT_STORAGE_URL``. Keys are relative, ``/``-separated paths that the service derives from ids
(``files/file-abc.jsonl``, ``jobs/ftjob-abc/adapter/adapter_model.safetensors``); they are validated anyway.

A missing key raises :class:`FileNotFoundError` from ``open``, ``size`` and ``path_for_read`` in both backends.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast
from urllib.parse import unquote, urlsplit

_KEY_RE = re.compile(r"[A-Za-z0-9._/-]+")
_CHUNK = 1024 * 1024


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative storage key, else raise ``ValueError``.

    Allowed: ``[A-Za-z0-9._/-]``, no leading ``/``, no ``..``, no empty or ``.`` path segments.
    """
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise ValueError(f"invalid storage key {key!r}: only [A-Za-z0-9._/-] allowed")
    if key.startswith("/") or ".." in key:
        raise ValueError(f"invalid storage key {key!r}: no leading '/' and no '..'")
    if any(part in ("", ".") for part in key.split("/")):
        raise ValueError(f"invalid storage key {key!r}: empty or '.' path segment")
    return key


class Storage(Protocol):
    """Where artifacts live. Every method takes a key made by the service (see :func:`validate_key`)."""

    def put(self, key: str, src: BinaryIO | Path) -> int:
        """Store the bytes of a readable binary stream or a local file under ``key``; return bytes written."""
        ...

    def open(self, key: str) -> BinaryIO:
        """A readable binary stream of the object; the caller closes it."""
        ...

    def path_for_read(self, key: str) -> AbstractContextManager[Path]:
        """Context manager yielding a local file with the object's bytes (a temp copy for remote backends).

        The file keeps the key's base name, so loaders that go by suffix (``.safetensors``, ``.json``) work.
        """
        ...

    def delete(self, key: str) -> None:
        """Remove the object; a missing key is not an error."""
        ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int:
        """Size of the object in bytes."""
        ...


def _copy(src: BinaryIO, dst: BinaryIO) -> int:
    written = 0
    while chunk := src.read(_CHUNK):
        dst.write(chunk)
        written += len(chunk)
    return written


class LocalStorage:
    """Objects are files under ``root``; writes are atomic (temp file in the same directory, then rename)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        path = self.root / validate_key(key)
        # Belt and braces against a symlink inside root pointing out of it.
        if not path.resolve().is_relative_to(self.root):
            raise ValueError(f"invalid storage key {key!r}: resolves outside the storage root")
        return path

    def put(self, key: str, src: BinaryIO | Path) -> int:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                if isinstance(src, Path):
                    with src.open("rb") as f:
                        written = _copy(f, out)
                else:
                    written = _copy(src, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return written

    def open(self, key: str) -> BinaryIO:
        return self._path(key).open("rb")

    @contextmanager
    def path_for_read(self, key: str) -> Iterator[Path]:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(key)
        yield path

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(key)
        return path.stat().st_size


def _is_missing(err: Exception) -> bool:
    code = str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket")


class S3Storage:
    """Objects in an S3 bucket (AWS or compatible: MinIO, Ceph, moto), under an optional key prefix.

    Uploads go through ``upload_fileobj`` (multipart above boto3's threshold, so large adapters stream).
    The bucket is created on construction if it does not exist. Credentials left as ``None`` come from
    boto3's usual chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, profiles, instance roles).
    """

    def __init__(
        self,
        *,
        bucket: str,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key: str | None = None,
        secret_key: str | None = None,
        prefix: str = "",
    ) -> None:
        import boto3  # deferred: only S3 deployments pay for importing boto3
        from botocore.config import Config

        prefix = prefix.strip("/")
        self.bucket = bucket
        self.prefix = f"{validate_key(prefix)}/" if prefix else ""
        self.region = region
        # Path-style addressing: MinIO and other self-hosted endpoints have no per-bucket DNS names.
        config = Config(signature_version="s3v4", s3={"addressing_style": "path" if endpoint_url else "auto"})
        self.client: Any = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=config,
        )
        self._ensure_bucket()

    def __repr__(self) -> str:
        return f"S3Storage(bucket={self.bucket!r}, prefix={self.prefix!r}, endpoint={self.client.meta.endpoint_url!r})"

    def _ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as err:
            if not _is_missing(err):
                raise
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":  # us-east-1 rejects an explicit LocationConstraint
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self.client.create_bucket(**kwargs)
        except ClientError as err:  # another process created it first
            if err.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def _key(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def put(self, key: str, src: BinaryIO | Path) -> int:
        full = self._key(key)
        if isinstance(src, Path):
            with src.open("rb") as f:
                self.client.upload_fileobj(f, self.bucket, full)
        else:
            self.client.upload_fileobj(src, self.bucket, full)
        # S3 is strongly read-after-write consistent; the stored length is the authoritative count.
        return self.size(key)

    def open(self, key: str) -> BinaryIO:
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as err:
            if _is_missing(err):
                raise FileNotFoundError(key) from err
            raise
        # botocore's StreamingBody is an io.IOBase with read(n), close() and the context-manager protocol.
        return cast(BinaryIO, response["Body"])

    @contextmanager
    def path_for_read(self, key: str) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="pflat-s3-") as tmp:
            path = Path(tmp) / Path(key).name
            with self.open(key) as body, path.open("wb") as out:
                shutil.copyfileobj(body, out, _CHUNK)
            yield path

    def delete(self, key: str) -> None:
        # DeleteObject on a missing key succeeds in S3, so this is idempotent as is.
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except FileNotFoundError:
            return False
        return True

    def size(self, key: str) -> int:
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as err:
            if _is_missing(err):
                raise FileNotFoundError(key) from err
            raise
        return int(head["ContentLength"])


_S3_QUERY_KEYS = {"endpoint_url", "region", "access_key", "secret_key"}


def storage_from_url(url: str) -> Storage:
    """Build the storage a URL names.

    - ``file:///abs/path`` or a plain path (``/abs/path``, ``var/artifacts``): :class:`LocalStorage`.
    - ``s3://bucket/optional/prefix?endpoint_url=http://127.0.0.1:9000&region=eu-west-1``: :class:`S3Storage`;
      ``access_key`` / ``secret_key`` may be given in the query, else boto3 reads the standard ``AWS_*``
      variables (percent-encode ``&`` or ``%`` inside a value). Without ``region``, ``AWS_REGION`` /
      ``AWS_DEFAULT_REGION`` apply, else ``us-east-1``.

    Raises:
        ValueError: unknown scheme, unknown or repeated query parameter, ``file://`` URL with a remote host,
            or an ``s3://`` URL without a bucket.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "":  # a plain path
        return LocalStorage(Path(url))
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file:// storage URL must be local (file:///abs/path), got host {parts.netloc!r}")
        return LocalStorage(Path(unquote(parts.path)))
    if scheme == "s3":
        if not parts.netloc:
            raise ValueError("s3:// storage URL needs a bucket: s3://bucket/prefix")
        opts: dict[str, str] = {}
        for pair in filter(None, parts.query.split("&")):
            # Not parse_qs: it turns '+' into a space, and AWS secret keys contain '+'.
            name, _, value = pair.partition("=")
            name = unquote(name)
            if name not in _S3_QUERY_KEYS:
                raise ValueError(f"unknown s3 storage URL parameter {name!r}; allowed {sorted(_S3_QUERY_KEYS)}")
            if name in opts:
                raise ValueError(f"repeated s3 storage URL parameter {name!r}")
            opts[name] = unquote(value)
        region = opts.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return S3Storage(
            bucket=parts.netloc,
            prefix=unquote(parts.path),
            endpoint_url=opts.get("endpoint_url") or None,
            region=region or "us-east-1",
            access_key=opts.get("access_key") or None,
            secret_key=opts.get("secret_key") or None,
        )
    raise ValueError(f"unsupported storage URL scheme {parts.scheme!r} (use file://, s3:// or a plain path)")

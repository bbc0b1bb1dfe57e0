"""Both storage backends pass one contract; S3 runs against a real S3-compatible server (moto, loopback only)."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

import pytest

from store import storage as storage_mod
from store.storage import LocalStorage, S3Storage, Storage, storage_from_url, validate_key

BAD_KEYS = ["", "/abs/key", "../escape", "a/../b", "a/..", "..", "a//b", "a/./b", "./a", "a/", "sp ace",
            "back\\slash", "caf\u00e9", "new\nline", "q?x", "semi;colon"]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (ephemeral port) with dummy credentials; nothing leaves the machine."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
        mp.setenv("NO_PROXY", "127.0.0.1,localhost")
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL"):
            mp.delenv(name, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


def _bucket() -> str:
    return f"pflat-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "artifacts")
    endpoint = request.getfixturevalue("s3_endpoint")
    return S3Storage(bucket=_bucket(), endpoint_url=endpoint, prefix="artifacts")


class _NonSeekable(io.RawIOBase):
    """A read-only stream that cannot seek or tell (like a request body)."""

    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        chunk = self._buf.read(len(b))
        b[: len(chunk)] = chunk
        return len(chunk)


def _read(storage: Storage, key: str) -> bytes:
    with storage.open(key) as f:
        return f.read()


# ---- the contract, for both backends -------------------------------------------------------------------------


def test_put_stream_roundtrip(storage: Storage) -> None:
    data = b'{"text": "hi", "label": 1}\n' * 100
    assert not storage.exists("files/file-1.jsonl")
    assert storage.put("files/file-1.jsonl", io.BytesIO(data)) == len(data)
    assert storage.exists("files/file-1.jsonl")
    assert storage.size("files/file-1.jsonl") == len(data)
    assert _read(storage, "files/file-1.jsonl") == data


def test_put_from_path(storage: Storage, tmp_path: Path) -> None:
    src = tmp_path / "adapter_model.safetensors"
    src.write_bytes(b"\x00\x01weights" * 1000)
    assert storage.put("jobs/ftjob-1/adapter/adapter_model.safetensors", src) == src.stat().st_size
    assert _read(storage, "jobs/ftjob-1/adapter/adapter_model.safetensors") == src.read_bytes()


def test_put_from_non_seekable_stream(storage: Storage) -> None:
    data = bytes(range(256)) * 513
    assert storage.put("uploads/body.bin", cast(BinaryIO, _NonSeekable(data))) == len(data)
    assert _read(storage, "uploads/body.bin") == data


def test_empty_object(storage: Storage) -> None:
    assert storage.put("empty.txt", io.BytesIO(b"")) == 0
    assert storage.exists("empty.txt")
    assert storage.size("empty.txt") == 0
    assert _read(storage, "empty.txt") == b""


def test_large_object_multipart(storage: Storage) -> None:
    # Above boto3's 8 MiB multipart threshold, so S3 goes through CreateMultipartUpload / UploadPart.
    data = (b"0123456789abcdef" * 65536) * 9 + b"tail"
    assert storage.put("big/blob.bin", io.BytesIO(data)) == len(data)
    assert storage.size("big/blob.bin") == len(data)
    assert _read(storage, "big/blob.bin") == data


def test_overwrite_replaces(storage: Storage) -> None:
    storage.put("report.json", io.BytesIO(b"first, longer content"))
    storage.put("report.json", io.BytesIO(b"second"))
    assert _read(storage, "report.json") == b"second"
    assert storage.size("report.json") == 6


def test_open_reads_in_chunks(storage: Storage) -> None:
    storage.put("chunks.bin", io.BytesIO(b"abcdefghij"))
    with storage.open("chunks.bin") as f:
        assert f.read(4) == b"abcd"
        assert f.read() == b"efghij"


def test_missing_key(storage: Storage) -> None:
    assert not storage.exists("nope/missing.bin")
    with pytest.raises(FileNotFoundError):
        storage.open("nope/missing.bin")
    with pytest.raises(FileNotFoundError):
        storage.size("nope/missing.bin")
    with pytest.raises(FileNotFoundError), storage.path_for_read("nope/missing.bin"):
        pass


def test_delete_is_idempotent(storage: Storage) -> None:
    storage.put("tmp/x.bin", io.BytesIO(b"x"))
    storage.delete("tmp/x.bin")
    assert not storage.exists("tmp/x.bin")
    storage.delete("tmp/x.bin")
    storage.delete("never/existed.bin")


def test_path_for_read(storage: Storage) -> None:
    storage.put("jobs/ftjob-2/privacy_report.json", io.BytesIO(b'{"epsilon": 3.0}'))
    with storage.path_for_read("jobs/ftjob-2/privacy_report.json") as path:
        assert isinstance(path, Path)
        assert path.name == "privacy_report.json"  # loaders that go by suffix keep working
        assert path.read_bytes() == b'{"epsilon": 3.0}'
    assert storage.exists("jobs/ftjob-2/privacy_report.json")  # reading never consumes the object
    if isinstance(storage, S3Storage):
        assert not path.exists()  # the temp copy is gone


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_rejected(storage: Storage, key: str) -> None:
    for call in (
        lambda: storage.put(key, io.BytesIO(b"x")),
        lambda: storage.open(key),
        lambda: storage.exists(key),
        lambda: storage.size(key),
        lambda: storage.delete(key),
        lambda: storage.path_for_read(key).__enter__(),
    ):
        with pytest.raises(ValueError):
            call()


# ---- backend specifics ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["a", "files/file-abc.jsonl", "jobs/ftjob_1/adapter/adapter_config.json", "a.b-c_d"])
def test_good_keys_accepted(key: str) -> None:
    assert validate_key(key) == key


def test_local_write_is_atomic(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.put("d/obj.bin", io.BytesIO(b"old"))

    class Broken(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, b: Any) -> int:
            raise OSError("client went away")

    with pytest.raises(OSError, match="client went away"):
        storage.put("d/obj.bin", cast(BinaryIO, Broken()))
    assert _read(storage, "d/obj.bin") == b"old"  # the old object is intact
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["obj.bin"]  # no temp file left behind


def test_local_symlink_escape_rejected(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(outside)
    storage = LocalStorage(root)
    with pytest.raises(ValueError):
        storage.open("link/secret")


def test_s3_prefix_and_existing_bucket(s3_endpoint: str) -> None:
    bucket = _bucket()
    first = S3Storage(bucket=bucket, endpoint_url=s3_endpoint, prefix="/team/artifacts/")
    first.put("k.txt", io.BytesIO(b"v"))
    listed = first.client.list_objects_v2(Bucket=bucket)["Contents"]
    assert [o["Key"] for o in listed] == ["team/artifacts/k.txt"]
    again = S3Storage(bucket=bucket, endpoint_url=s3_endpoint, prefix="team/artifacts")  # bucket exists: reused
    assert _read(again, "k.txt") == b"v"


def test_s3_bucket_created_outside_us_east_1(s3_endpoint: str) -> None:
    storage = S3Storage(bucket=_bucket(), endpoint_url=s3_endpoint, region="eu-west-1")
    storage.put("k", io.BytesIO(b"v"))
    assert storage.client.get_bucket_location(Bucket=storage.bucket)["LocationConstraint"] == "eu-west-1"


# ---- storage_from_url ----------------------------------------------------------------------------------------


def test_url_file_and_plain_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from_file_url = storage_from_url(f"file://{tmp_path}/a")
    assert isinstance(from_file_url, LocalStorage) and from_file_url.root == tmp_path / "a"
    from_path = storage_from_url(str(tmp_path / "b"))
    assert isinstance(from_path, LocalStorage) and from_path.root == tmp_path / "b"
    monkeypatch.chdir(tmp_path)
    relative = storage_from_url("var/artifacts")
    assert isinstance(relative, LocalStorage) and relative.root == tmp_path / "var" / "artifacts"
    assert storage_from_url(f"file://localhost{tmp_path}/c").root == tmp_path / "c"  # type: ignore[attr-defined]


def test_url_s3_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []

    def record(**kwargs: Any) -> dict[str, Any]:
        seen.append(kwargs)
        return kwargs

    monkeypatch.setattr(storage_mod, "S3Storage", record)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    storage_from_url("s3://bkt/some/prefix?endpoint_url=http://127.0.0.1:9000&region=eu-west-1"
                     "&access_key=AK&secret_key=a%2Fb+c")
    storage_from_url("s3://bkt")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    storage_from_url("s3://bkt/p/")
    assert seen == [
        {"bucket": "bkt", "prefix": "/some/prefix", "endpoint_url": "http://127.0.0.1:9000", "region": "eu-west-1",
         "access_key": "AK", "secret_key": "a/b+c"},  # '+' survives: AWS secrets contain it
        {"bucket": "bkt", "prefix": "", "endpoint_url": None, "region": "us-east-1", "access_key": None,
         "secret_key": None},
        {"bucket": "bkt", "prefix": "/p/", "endpoint_url": None, "region": "ap-south-1", "access_key": None,
         "secret_key": None},
    ]


@pytest.mark.parametrize("url", ["gs://bkt/x", "s3:///no-bucket", "s3://bkt?endpoint=http://x",
                                 "s3://bkt?region=a&region=b", "file://remote-host/data"])
def test_url_rejected(url: str) -> None:
    with pytest.raises(ValueError):
        storage_from_url(url)


def test_url_s3_end_to_end(s3_endpoint: str) -> None:
    bucket = _bucket()
    storage = storage_from_url(f"s3://{bucket}/pre?endpoint_url={s3_endpoint}&access_key=testing&secret_key=testing")
    assert isinstance(storage, S3Storage) and storage.prefix == "pre/"
    storage.put("k.bin", io.BytesIO(b"data"))
    assert _read(storage, "k.bin") == b"data"
    env_creds = storage_from_url(f"s3://{bucket}/pre?endpoint_url={s3_endpoint}")  # creds from AWS_* env
    assert _read(env_creds, "k.bin") == b"data"

"""Where export files go: a local directory, or any S3-compatible bucket.

Both take *relative paths* (``exports/<id>/part-00000.parquet``,
``schedules/<org>/<prefix>/dt=…/hour=…/manifest.json``) and hand out a :class:`Sink`,
a write-only file object that:

- streams: S3 receives a multipart upload, one part per ``S3_PART_BYTES`` written,
  so a file of any size needs that much memory; the local sink writes a
  ``.partial`` file;
- is atomic: the object appears only on :meth:`Sink.commit` (S3 completes the
  multipart upload; locally the partial file is renamed), and :meth:`Sink.abort`
  leaves nothing behind (S3 aborts the upload). A reader never sees half a file, and
  re-writing a path replaces it whole;
- counts and hashes what it wrote (size and SHA-256 for the manifest).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path, PurePosixPath

from tollgate.settings import Settings

S3_PART_BYTES = 8 * 1024 * 1024  # S3's minimum part is 5 MiB (except the last)


def check_relpath(relpath: str) -> str:
    p = PurePosixPath(relpath)
    if p.is_absolute() or not p.parts or any(part in ("", ".", "..") for part in p.parts):
        raise ValueError(f"not a relative path: {relpath!r}")
    return str(p)


class Sink:
    """A file being written; subclasses move the bytes."""

    def __init__(self, relpath: str):
        self.relpath = relpath
        self.size = 0
        self._hash = hashlib.sha256()
        self.closed = False

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self.size += len(view)
        self._write(view)
        return len(view)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def close(self) -> None:  # pyarrow may call it; committing is explicit
        pass

    def _write(self, view: memoryview) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError


class LocalSink(Sink):
    def __init__(self, root: Path, relpath: str):
        super().__init__(relpath)
        self.path = root / relpath
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.partial = self.path.with_name(f"{self.path.name}.partial-{uuid.uuid4().hex[:8]}")
        self._f = open(self.partial, "wb")

    def _write(self, view: memoryview) -> None:
        self._f.write(view)

    def commit(self) -> None:
        self._f.close()
        os.replace(self.partial, self.path)
        self.closed = True

    def abort(self) -> None:
        self._f.close()
        self.partial.unlink(missing_ok=True)
        self.closed = True


class Destination:
    name = ""

    def open(self, relpath: str) -> Sink:
        raise NotImplementedError

    def list(self, prefix: str) -> list[str]:
        """Relative paths of the files under ``prefix`` (a directory), recursively."""
        raise NotImplementedError

    def delete(self, relpaths: list[str]) -> None:
        raise NotImplementedError

    def read(self, relpath: str) -> bytes:
        raise NotImplementedError

    def location(self, relpath: str) -> str:
        raise NotImplementedError

    def delete_prefix(self, prefix: str) -> None:
        self.delete(self.list(prefix))


class LocalDestination(Destination):
    name = "local"

    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    def path(self, relpath: str) -> Path:
        return self.root / check_relpath(relpath)

    def open(self, relpath: str) -> Sink:
        return LocalSink(self.root, check_relpath(relpath))

    def list(self, prefix: str) -> list[str]:
        base = self.path(prefix)
        if not base.is_dir():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file())

    def delete(self, relpaths: list[str]) -> None:
        for rel in relpaths:
            self.path(rel).unlink(missing_ok=True)
        # remove directories left empty (best effort)
        for rel in sorted({str(PurePosixPath(r).parent) for r in relpaths}, key=len, reverse=True):
            d = self.path(rel)
            while d != self.root and d.is_dir() and not any(d.iterdir()):
                d.rmdir()
                d = d.parent

    def read(self, relpath: str) -> bytes:
        return self.path(relpath).read_bytes()

    def location(self, relpath: str) -> str:
        return str(self.path(relpath))


class S3Sink(Sink):
    def __init__(self, client, bucket: str, key: str, relpath: str):
        super().__init__(relpath)
        self.client, self.bucket, self.key = client, bucket, key
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict] = []

    def _write(self, view: memoryview) -> None:
        self._buf += view
        if len(self._buf) >= S3_PART_BYTES:
            self._send_part()

    def _send_part(self) -> None:
        if self._upload_id is None:
            self._upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=self.key)["UploadId"]
        number = len(self._parts) + 1
        r = self.client.upload_part(Bucket=self.bucket, Key=self.key, UploadId=self._upload_id, PartNumber=number,
                                    Body=bytes(self._buf))
        self._parts.append({"PartNumber": number, "ETag": r["ETag"]})
        self._buf = bytearray()

    def commit(self) -> None:
        if self._upload_id is None:
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=bytes(self._buf))
        else:
            if self._buf:
                self._send_part()
            self.client.complete_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self._upload_id,
                                                  MultipartUpload={"Parts": self._parts})
        self._buf = bytearray()
        self.closed = True

    def abort(self) -> None:
        if self._upload_id is not None:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self._upload_id)
            except Exception:  # already gone; nothing was published either way
                pass
        self._buf = bytearray()
        self.closed = True


class S3Destination(Destination):
    name = "s3"

    def __init__(self, settings: Settings):
        import boto3
        from botocore.config import Config

        if not settings.export_s3_bucket:
            raise ValueError("TOLLGATE_EXPORT_S3_BUCKET is required for the s3 export destination")
        self.bucket = settings.export_s3_bucket
        self.prefix = settings.export_s3_prefix.strip("/")
        self.client = boto3.client(
            "s3",
            endpoint_url=settings.export_s3_endpoint or None,
            region_name=settings.export_s3_region,
            aws_access_key_id=settings.export_s3_access_key_id or None,
            aws_secret_access_key=settings.export_s3_secret_access_key or None,
            config=Config(signature_version="s3v4", retries={"max_attempts": 5, "mode": "standard"},
                          s3={"addressing_style": "path"}),
        )

    def key(self, relpath: str) -> str:
        rel = check_relpath(relpath)
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def open(self, relpath: str) -> Sink:
        return S3Sink(self.client, self.bucket, self.key(relpath), relpath)

    def list(self, prefix: str) -> list[str]:
        base = self.key(prefix).rstrip("/") + "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        found = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
            found.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        return sorted(found)

    def delete(self, relpaths: list[str]) -> None:
        for i in range(0, len(relpaths), 1000):
            chunk = relpaths[i:i + 1000]
            if chunk:
                self.client.delete_objects(Bucket=self.bucket,
                                           Delete={"Objects": [{"Key": self.key(r)} for r in chunk], "Quiet": True})

    def read(self, relpath: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self.key(relpath))["Body"].read()

    def location(self, relpath: str) -> str:
        return f"s3://{self.bucket}/{self.key(relpath)}"

    def presign(self, relpath: str, ttl_seconds: int) -> str:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.key(relpath)}, ExpiresIn=ttl_seconds
        )


def destination(settings: Settings, name: str | None = None) -> Destination:
    """The destination called ``name`` (default: ``TOLLGATE_EXPORT_DESTINATION``)."""
    name = name or settings.export_destination
    if name == "local":
        return LocalDestination(settings.export_root)
    if name == "s3":
        return S3Destination(settings)
    raise ValueError(f"unknown export destination {name!r}")

"""Corpus uploads: chunked, size-limited, checksummed, under names that cannot escape.

A client announces a file (`name`, `size`, `sha256`), sends it in chunks of at most
`CHUNK_BYTES` at increasing offsets, and finishes. Chunks land in a private temporary file under
`uploads/`; only when every byte has arrived and the SHA-256 matches is it renamed into
`corpora/`, so a half-sent or corrupted corpus is never visible to jobs. Names are plain file
names with a corpus extension: no directories, no `..`, no hidden files.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from mistudio_core.errors import MistudioError

CHUNK_BYTES = 4 << 20
CORPUS_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.(txt|jsonl|parquet)"
# An upload that receives nothing for this long is abandoned and its partial file removed.
STALE_AFTER_S = 3600.0


def check_corpus_name(name: str, field: str = "name") -> str:
    if not re.fullmatch(CORPUS_NAME, name) or ".." in name:
        raise MistudioError(
            f"{name!r} is not an allowed corpus name",
            hint="use a plain file name (letters, digits, . _ -) ending in .txt, .jsonl or "
                 ".parquet, without directories",
            code="bad_request", field=field,
        )
    return name


@dataclass
class Upload:
    name: str
    size: int
    sha256: str
    who: str
    path: Path
    received: int = 0
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    touched: float = field(default_factory=time.time)


class Uploads:
    def __init__(self, staging: Path, corpora: Path, max_bytes: int) -> None:
        self.staging = staging
        self.corpora = corpora
        self.max_bytes = max_bytes
        self.active: dict[str, Upload] = {}

    def begin(self, name: str, size: int, sha256: str, who: str) -> str:
        check_corpus_name(name)
        if size > self.max_bytes:
            raise MistudioError(
                f"a corpus of {size} bytes is over the daemon's limit of {self.max_bytes}",
                hint="split it, or start the daemon with a larger --max-corpus-bytes",
                code="too_large",
            )
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise MistudioError("sha256 must be 64 lowercase hex digits",
                                hint="send hashlib.sha256(data).hexdigest()", code="bad_request")
        self.drop_stale()
        upload_id = uuid.uuid4().hex
        path = self.staging / f"{upload_id}.part"
        path.touch(mode=0o600)
        self.active[upload_id] = Upload(name, size, sha256, who, path)
        return upload_id

    def chunk(self, upload_id: str, offset: int, data: bytes) -> int:
        upload = self._get(upload_id)
        if offset != upload.received:
            raise MistudioError(
                f"chunk at offset {offset}, expected {upload.received}",
                hint="send the chunks in order, each once", code="bad_request",
            )
        if upload.received + len(data) > upload.size:
            self.abort(upload_id)
            raise MistudioError("more bytes than the announced size; upload abandoned",
                                hint="announce the file's exact size", code="bad_request")
        with open(upload.path, "ab") as handle:
            handle.write(data)
        upload.digest.update(data)
        upload.received += len(data)
        upload.touched = time.time()
        return upload.received

    def finish(self, upload_id: str) -> tuple[Upload, Path]:
        upload = self._get(upload_id)
        self.active.pop(upload_id)
        if upload.received != upload.size or upload.digest.hexdigest() != upload.sha256:
            upload.path.unlink(missing_ok=True)
            raise MistudioError(
                f"{upload.name}: received {upload.received} of {upload.size} bytes, sha256 "
                f"{upload.digest.hexdigest()[:12]}... (expected {upload.sha256[:12]}...)",
                hint="the upload was corrupted or cut short; send it again", code="bad_upload",
            )
        destination = self.corpora / upload.name
        os.replace(upload.path, destination)
        return upload, destination

    def abort(self, upload_id: str) -> None:
        upload = self.active.pop(upload_id, None)
        if upload is not None:
            upload.path.unlink(missing_ok=True)

    def drop_stale(self) -> None:
        limit = time.time() - STALE_AFTER_S
        for upload_id in [i for i, u in self.active.items() if u.touched < limit]:
            self.abort(upload_id)

    def _get(self, upload_id: str) -> Upload:
        upload = self.active.get(upload_id)
        if upload is None:
            raise MistudioError(f"no upload {upload_id!r} in progress",
                                hint="begin the upload first (it may have been abandoned)",
                                code="bad_request")
        return upload

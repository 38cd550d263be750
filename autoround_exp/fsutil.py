"""Ground-floor file utilities: locks, atomic writes and content digests. Imports nothing of
the package, so every module may use them."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: str | Path) -> str | None:
    p = Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.is_file() else None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 * 2**20):
            h.update(chunk)
    return h.hexdigest()[:16]


class DigestCache:
    """Content digests of local files, kept by (path, size, mtime_ns): every byte counts in a
    run's key, and a re-run (a sweep validates and keys every job) reads nothing again."""

    SLOW_BYTES = 2**30  # the first hash of a file this large is timed and said

    def __init__(self, path: Path | None):
        self.path = path
        self._entries: dict[str, dict] | None = None

    def _load(self) -> dict[str, dict]:
        if self._entries is None:
            self._entries = {}
            if self.path is not None and self.path.is_file():
                with contextlib.suppress(ValueError):
                    self._entries = json.loads(self.path.read_text())
        return self._entries

    def digest(self, file: Path) -> str:
        st = file.stat()
        name = str(file.resolve())
        hit = self._load().get(name)
        if hit and hit["size"] == st.st_size and hit["mtime_ns"] == st.st_mtime_ns:
            return hit["digest"]
        t0 = time.perf_counter()
        digest = sha256_file(file)
        if st.st_size >= self.SLOW_BYTES:
            print(
                f"[identity] hashed {file.name} ({st.st_size / 2**30:.1f} GB) in {time.perf_counter() - t0:.0f} s; "
                "cached for later runs",
                flush=True,
            )
        self._entries[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "digest": digest}
        self._save(name)
        return digest

    def _save(self, name: str) -> None:
        if self.path is None:
            return
        # parallel jobs share the cache: merge under a lock, never lose another job's entry
        with locked(self.path.with_name(f".{self.path.name}.lock")):
            entries = {}
            if self.path.is_file():
                with contextlib.suppress(ValueError):
                    entries = json.loads(self.path.read_text())
            entries[name] = self._entries[name]
            write_atomic(self.path, json.dumps(entries, indent=0, sort_keys=True))


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive lock on ``path`` (created if needed), held for the block. Parallel jobs
    (launcher=submitit_*) that need the same run or checkpoint take turns: the second finds
    the first's result and reuses it. The OS releases the lock if its holder is killed."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_atomic(path: Path, text: str) -> bool:
    """Write ``text`` under a temporary name and rename it over ``path``, so a reader never
    sees half a file; leave ``path`` alone when it already holds ``text``. True if written."""
    if path.is_file() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)
    return True

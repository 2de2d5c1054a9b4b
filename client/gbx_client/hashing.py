"""Canonical hashes of files and trees, reproducible with coreutils.

A file hashes to the SHA-256 of its bytes. A directory hashes to the SHA-256 of the listing that
`(cd DIR && find . -type f -print0 | LC_ALL=C sort -z | xargs -0r sha256sum)` prints: one
`<hex>  ./relative/path` line per regular file, sorted bytewise by path. Anything that listing
would skip or spell ambiguously (symlinks, special files, names with a newline, carriage return
or backslash, which sha256sum escapes) is an error, never silently left out.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from gbx_client.errors import DataError, IOFailure, NoInput, printable

# sha256sum escapes names holding these (coreutils 9.1+ also "\r"), so the listing would not be
# the plain path: refuse them rather than depend on a coreutils version.
_AMBIGUOUS = (b"\n", b"\r", b"\\")
_CHUNK = 1 << 20  # 1 MiB reads: few syscalls, and hashlib releases the GIL for each update
# O_NOFOLLOW: a file swapped for a symlink after the scan is refused, not followed.
# O_NONBLOCK: a file swapped for a FIFO cannot block the open (regular files ignore it).
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class Listing:
    """What a path holds to be hashed: one file, or a directory's regular files sorted as `sort -z` sorts them."""

    path: Path
    is_dir: bool
    files: tuple[bytes, ...]  # "./a/b" paths relative to a directory; empty for a single file


@dataclass(frozen=True)
class Digest:
    """A canonical hash and what it covered."""

    sha256: str
    files: int
    bytes: int
    seconds: float

    def describe(self) -> str:
        """One progress phrase: files, size, time and rate."""
        rate = self.bytes / self.seconds if self.seconds > 0 else 0.0
        return f"{self.files} file{'s' if self.files != 1 else ''}, {format_size(self.bytes)} in {self.seconds:.2f} s ({format_size(rate)}/s)"


def default_workers() -> int:
    """Threads for hashing: one per core, at least two (I/O overlaps hashing even on one core)."""
    return max(2, min(16, os.cpu_count() or 1))


def scan(path: Path) -> Listing:
    """List what `path` holds for hashing; raise DataError for anything the canonical rule refuses."""
    try:
        mode = os.stat(path).st_mode  # the top-level path is followed, as `cd DIR` and `sha256sum FILE` do
    except FileNotFoundError as exc:
        raise NoInput(f"{printable(path)}: no such file or directory") from exc
    except OSError as exc:
        raise NoInput(f"{printable(path)}: {exc.strerror}") from exc
    if stat.S_ISREG(mode):
        return Listing(path=path, is_dir=False, files=())
    if not stat.S_ISDIR(mode):
        raise DataError(f"{printable(path)}: not a regular file or directory")
    return Listing(path=path, is_dir=True, files=tuple(sorted(_walk(os.fsencode(path)))))


def _walk(root: bytes) -> list[bytes]:
    """Every regular file under root as b"./rel/path"; refuse symlinks, special files and ambiguous names."""
    found: list[bytes] = []
    pending: list[bytes] = [b"."]
    while pending:
        relative = pending.pop()
        directory = os.path.join(root, relative)
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    child = relative + b"/" + entry.name
                    if any(char in entry.name for char in _AMBIGUOUS):
                        raise DataError(f"{_show(root, child)}: a name with a newline, carriage return or backslash cannot be hashed canonically")
                    # d_type from scandir: no extra stat per entry.
                    if entry.is_symlink():
                        raise DataError(f"{_show(root, child)}: symlinks are not hashed (the coreutils listing would skip it)")
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(child)
                    elif entry.is_file(follow_symlinks=False):
                        found.append(child)
                    else:
                        raise DataError(f"{_show(root, child)}: special files (FIFOs, sockets, devices) are not hashed")
        except OSError as exc:
            raise NoInput(f"{_show(root, relative)}: {exc.strerror}") from exc
    return found


def hash_listing(listing: Listing, *, workers: int | None = None) -> Digest:
    """Hash a scanned path: files in parallel, then the sha256sum-style listing of a directory."""
    started = time.perf_counter()
    if not listing.is_dir:
        # The path itself may be a symlink (as `sha256sum FILE` follows it); only entries inside a tree may not.
        digest, size = _hash_file(os.fsencode(os.path.realpath(listing.path)), bytearray(_CHUNK))
        return Digest(sha256=digest.hex(), files=1, bytes=size, seconds=time.perf_counter() - started)
    root = os.fsencode(listing.path)
    paths = [os.path.join(root, name) for name in listing.files]
    results = _hash_files(paths, workers or default_workers())
    lines = b"".join(
        digest.hex().encode("ascii") + b"  " + name + b"\n" for name, (digest, _) in zip(listing.files, results, strict=True)
    )
    total = sum(size for _, size in results)
    return Digest(
        sha256=hashlib.sha256(lines).hexdigest(), files=len(paths), bytes=total, seconds=time.perf_counter() - started
    )


def canonical_hash(path: Path, *, workers: int | None = None) -> Digest:
    """Scan and hash a file or directory by the canonical rule."""
    return hash_listing(scan(path), workers=workers)


def _hash_files(paths: list[bytes], workers: int) -> list[tuple[bytes, int]]:
    """Hash files on a few threads pulling from one counter (no future per file: 10,000 futures cost more than they save)."""
    results: list[tuple[bytes, int] | None] = [None] * len(paths)
    errors: list[BaseException] = []
    # next() on itertools.count is atomic under the GIL, so each index is taken exactly once.
    counter = itertools.count()

    def work() -> None:
        buffer = bytearray(_CHUNK)
        for index in counter:
            if index >= len(paths) or errors:
                return
            try:
                results[index] = _hash_file(paths[index], buffer)
            except BaseException as exc:  # handed to the caller's thread below
                errors.append(exc)
                return

    threads = [threading.Thread(target=work, daemon=True) for _ in range(min(workers, len(paths)) - 1)]
    for thread in threads:
        thread.start()
    work()  # the calling thread hashes too
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [result for result in results if result is not None]


def _hash_file(path: bytes, buffer: bytearray) -> tuple[bytes, int]:
    """SHA-256 of one regular file, read in large chunks into a reused buffer; (digest, size)."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise _read_error(path, exc) from exc
    view = memoryview(buffer)
    digest = hashlib.sha256()
    size = 0
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DataError(f"{printable(path)}: changed into a non-regular file while hashing")
        with open(fd, "rb", buffering=0, closefd=False) as stream:
            while count := stream.readinto(buffer):
                digest.update(view[:count])
                size += count
    except OSError as exc:
        raise IOFailure(f"{printable(path)}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    return digest.digest(), size


def _read_error(path: bytes, exc: OSError) -> Exception:
    """The gbx error for a file that cannot be opened."""
    shown = printable(path)
    if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink that replaced the file after the scan
        return DataError(f"{shown}: became a symlink while hashing")
    if isinstance(exc, FileNotFoundError):
        return NoInput(f"{shown}: vanished while hashing")
    return NoInput(f"{shown}: {exc.strerror}")


def _show(root: bytes, relative: bytes) -> str:
    """A path for a message: root joined with the relative path; control characters and undecodable bytes escaped."""
    return printable(os.path.normpath(os.path.join(root, relative)))


def format_size(count: float) -> str:
    """A byte count in binary units."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")

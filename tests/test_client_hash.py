"""`gbx hash`: the canonical hash of files and trees equals what the coreutils pipeline prints, and refuses what it cannot spell."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.test_client import GBX, coreutils_hash

EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def gbx_hash(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed `gbx hash`."""
    assert GBX is not None
    return subprocess.run([GBX, "hash", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A tree whose names sort differently bytewise than by walk order, with odd but allowed names."""
    root = tmp_path / "tree"
    for relative, data in {
        "a/b": b"1",
        "a-b/x": b"2",  # "-" (0x2d) sorts before "/" (0x2f): ./a-b/x comes before ./a/b
        "a.b": b"3",
        "A": b"4",
        ".hidden": b"5",
        "-n": b"leading dash",
        "with space/tab\there": b"6",
        "quotes'\"*?[]": b"7",
        "caf\u00e9/\u65e5\u672c.txt": b"utf-8",
        "empty": b"",
        "deep/er/and/deeper/file": b"8",
        "big.bin": os.urandom(3 * 1024 * 1024 + 17),  # several 1 MiB reads, and a short one
    }.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "empty-dir" / "nested").mkdir(parents=True)  # find -type f lists nothing for these
    with open(os.path.join(os.fsencode(root), b"latin1-\xff.bin"), "wb") as undecodable:  # a name that is not UTF-8
        undecodable.write(b"bytes")
    return root


def test_directory_hash_equals_the_coreutils_pipeline(tree: Path) -> None:
    expected = coreutils_hash(tree)
    for workers in ("1", "2", "8"):
        done = gbx_hash(str(tree), "--workers", workers)
        assert done.returncode == 0, done.stderr
        assert done.stdout == expected + "\n"
    assert "13 files" in done.stderr and "3.00 MiB" in done.stderr


def test_file_and_empty_directory(tree: Path, tmp_path: Path) -> None:
    big = tree / "big.bin"
    assert gbx_hash(str(big)).stdout.strip() == coreutils_hash(big)
    # A path given as a symlink is followed, as `cd DIR` and `sha256sum FILE` follow it; only entries inside a tree may not be symlinks.
    (tmp_path / "big-link").symlink_to(big)
    (tmp_path / "tree-link").symlink_to(tree)
    assert gbx_hash(str(tmp_path / "big-link")).stdout.strip() == coreutils_hash(big)
    assert gbx_hash(str(tmp_path / "tree-link")).stdout.strip() == coreutils_hash(tree)
    empty = tmp_path / "nothing"
    empty.mkdir()
    assert gbx_hash(str(empty)).stdout.strip() == EMPTY_SHA256 == coreutils_hash(empty)


def test_several_paths_and_json(tree: Path) -> None:
    both = gbx_hash(str(tree), str(tree / "a.b"))
    assert both.stdout.splitlines() == [f"{coreutils_hash(tree)}  {tree}", f"{coreutils_hash(tree / 'a.b')}  {tree / 'a.b'}"]
    as_json = json.loads(gbx_hash("--json", str(tree / "a.b")).stdout)
    assert as_json["sha256"] == coreutils_hash(tree / "a.b") and as_json["files"] == 1 and as_json["bytes"] == 1


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: (root / "link").symlink_to("a.b"), "symlinks are not hashed"),
        (lambda root: (root / "dirlink").symlink_to("a"), "symlinks are not hashed"),
        (lambda root: os.mkfifo(root / "a" / "fifo"), "special files (FIFOs, sockets, devices) are not hashed"),
        (lambda root: (root / "new\nline").write_bytes(b""), "a name with a newline, carriage return or backslash"),
        (lambda root: (root / "carriage\rreturn").write_bytes(b""), "a name with a newline, carriage return or backslash"),
        (lambda root: (root / "a" / "back\\slash").mkdir(), "a name with a newline, carriage return or backslash"),
    ],
)
def test_what_the_listing_cannot_spell_is_an_error(tree: Path, make: object, message: str) -> None:
    make(tree)  # type: ignore[operator]
    done = gbx_hash(str(tree))
    assert done.returncode == 65 and done.stdout == ""
    assert done.stderr.strip().startswith("gbx: exit 65 (data): ") and message in done.stderr


def test_missing_path_is_no_input(tmp_path: Path) -> None:
    done = gbx_hash(str(tmp_path / "absent"))
    assert done.returncode == 66 and "no such file or directory" in done.stderr


def test_a_reader_that_goes_away_is_not_a_crash(tree: Path) -> None:
    """`gbx … | head` closes stdout early: gbx ends like a tool killed by SIGPIPE, without a traceback."""
    paths = [str(tree)] * 2000  # more output than a pipe buffers, so gbx writes after the reader is gone
    script = f'"{GBX}" hash "$@" | true; echo "status=${{PIPESTATUS[0]}}" >&2'
    result = subprocess.run(["bash", "-c", script, "bash", *paths], capture_output=True, text=True, timeout=120, check=False)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == "status=141"
    assert lines[-2] == "gbx: exit 141 (broken-pipe): the reader of stdout went away"

"""gbx_client.tlog, the seal log's formats: against transparency-dev/merkle's test vectors, the C2SP examples and trees built here."""

from __future__ import annotations

import base64
import hashlib
import json
import random
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gbx_client import tlog

VECTORS = json.loads((Path(__file__).parent / "vectors" / "merkle" / "vectors.json").read_text())


def b64(value: str | None) -> bytes:
    return base64.b64decode(value or "")


@pytest.mark.parametrize("case", VECTORS["inclusion"], ids=lambda c: c["file"])
def test_inclusion_vectors(case: dict[str, Any]) -> None:
    """Every inclusion vector of transparency-dev/merkle: happy paths verify, every mutation fails."""
    args = {"index": case["leafIdx"], "size": case["treeSize"], "leaf": b64(case["leafHash"]), "proof": [b64(p) for p in case["proof"] or []], "root": b64(case["root"])}
    if case["wantErr"]:
        with pytest.raises(tlog.LogVerificationError):
            tlog.verify_inclusion(**args)
    else:
        tlog.verify_inclusion(**args)


@pytest.mark.parametrize("case", VECTORS["consistency"], ids=lambda c: c["file"])
def test_consistency_vectors(case: dict[str, Any]) -> None:
    """Every consistency vector of transparency-dev/merkle."""
    args = {"size1": case["size1"], "size2": case["size2"], "proof": [b64(p) for p in case["proof"] or []], "root1": b64(case["root1"]), "root2": b64(case["root2"])}
    if case["wantErr"]:
        with pytest.raises(tlog.LogVerificationError):
            tlog.verify_consistency(**args)
    else:
        tlog.verify_consistency(**args)


def test_rfc6962_reference_roots() -> None:
    """The empty tree's root is SHA-256 of nothing; the merkle project's 8-leaf tree of its test leaves has its published root."""
    assert tlog.root_of_leaves([]) == hashlib.sha256(b"").digest()
    leaves = [b"", b"\x00", b"\x10", b"\x20\x21", b"\x30\x31", b"\x40\x41\x42\x43", b"\x50\x51\x52\x53\x54\x55\x56\x57", b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f"]
    root = tlog.root_of_leaves([tlog.leaf_hash(x) for x in leaves])
    happy = next(c for c in VECTORS["inclusion"] if c["treeSize"] == 8 and c["desc"] == "happy path")
    assert root == b64(happy["root"])


class MemoryLog:
    """A log kept in memory the way the service keeps it: tiles grown by append_to_tiles in batches."""

    def __init__(self) -> None:
        self.tiles: dict[tuple[int, int], bytes] = {}
        self.size = 0
        self.leaves: list[bytes] = []
        self.reads = 0

    def read(self, level: int, index: int, width: int) -> bytes:
        self.reads += 1
        data = self.tiles[(level, index)]
        assert len(data) >= width * tlog.HASH_SIZE
        return data[: width * tlog.HASH_SIZE]

    def append(self, entries: list[bytes]) -> None:
        hashes = [tlog.leaf_hash(e) for e in entries]
        self.tiles.update(tlog.append_to_tiles(self.read, self.size, hashes))
        self.size += len(entries)
        self.leaves += hashes


def grown(total: int, seed: int = 1) -> MemoryLog:
    rng = random.Random(seed)
    log = MemoryLog()
    while log.size < total:
        n = min(total - log.size, rng.choice([1, 2, 3, 7, 64, 200, 255, 256, 257, 600]))
        log.append([hashlib.sha256(str(log.size + i).encode()).digest() for i in range(n)])
    return log


@pytest.mark.parametrize("size", [1, 2, 3, 7, 8, 255, 256, 257, 511, 513, 65536 + 300])
def test_tiles_hash_to_the_reference_root_and_prove_inclusion(size: int) -> None:
    """Tiles grown in uneven batches hash to the RFC's root; proofs read from them verify with the RFC's verifier."""
    log = grown(size)
    tiles = tlog.TileHashes(log.read, size)
    root = tiles.root()
    if size < 5000:
        assert root == tlog.root_of_leaves(log.leaves)
    for index in {0, size // 2, size - 1, random.Random(size).randrange(size)}:
        proof = tlog.TileHashes(log.read, size).inclusion_proof(index)
        tlog.verify_inclusion(index=index, size=size, leaf=log.leaves[index], proof=proof, root=root)
    # Tile widths as tlog-tiles defines them, at every level.
    for (level, index), data in log.tiles.items():
        assert len(data) == tlog.tile_width(level, index, size) * tlog.HASH_SIZE


def test_consistency_proofs_from_tiles() -> None:
    """Every pair of sizes of a small log, and a few of a larger one: the proof built from tiles verifies; a wrong root fails."""
    log = grown(300, seed=2)
    roots = {n: tlog.root_of_leaves(log.leaves[:n]) for n in range(301)}
    for old in range(1, 301, 7):
        for new in range(old, 301, 11):
            proof = tlog.TileHashes(log.read, new).consistency_proof(old)
            tlog.verify_consistency(size1=old, size2=new, proof=proof, root1=roots[old], root2=roots[new])
            if old < new:
                with pytest.raises(tlog.LogVerificationError):
                    tlog.verify_consistency(size1=old, size2=new, proof=proof, root1=roots[old - 1] if old > 1 else roots[2], root2=roots[new])


def test_proof_reads_a_constant_number_of_tiles() -> None:
    """An inclusion proof in a log of 70,000 entries reads a handful of tiles (about one per level), not thousands."""
    log = grown(70000, seed=3)
    tiles = tlog.TileHashes(log.read, 70000)
    tiles.inclusion_proof(12345)
    assert tiles.tiles_read <= 6


def test_c2sp_tile_example() -> None:
    """tlog-tiles' example: a tree of 70,000 entries is 273 full level-0 tiles and a partial one of 112, a full level-1 tile and a
    partial one of 17, and a partial level-2 tile of 1; a tree of 256 is a full level-0 tile and a partial level-1 tile of 1."""
    assert [tlog.tile_width(0, i, 70000) for i in (272, 273, 274)] == [256, 112, 0]
    assert [tlog.tile_width(1, i, 70000) for i in (0, 1, 2)] == [256, 17, 0]
    assert [tlog.tile_width(2, i, 70000) for i in (0, 1)] == [1, 0]
    assert [tlog.tile_width(0, 0, 256), tlog.tile_width(1, 0, 256)] == [256, 1]


@pytest.mark.parametrize(
    ("level", "index", "width", "path"),
    [(0, 1234067, 256, "tile/0/x001/x234/067"), (1, 0, 17, "tile/1/000.p/17"), ("entries", 1000, 256, "tile/entries/x001/000"), (63, 5, 1, "tile/63/005.p/1")],
)
def test_tile_paths(level: int | str, index: int, width: int, path: str) -> None:
    """Index groups of three digits, all but the last x-prefixed; `.p/W` for partial tiles; paths parse back."""
    assert tlog.tile_path(level, index, width) == path
    assert tlog.parse_tile_path(path) == (level, index, width)


@pytest.mark.parametrize(
    "path",
    ["tile/0/1", "tile/0/0001", "tile/0/x000/001", "tile/64/000", "tile/00/000", "tile/0/000.p/0", "tile/0/000.p/256", "tile/0/000.p/017",
     "tile/0/x1/001", "tile/0/001/x002", "tile/foo/000", "tile/0/000/", "tile/0/-01", "tile/0/000.p/", "tile//000"],
)
def test_malformed_tile_paths(path: str) -> None:
    """Anything tlog-tiles does not name is refused."""
    with pytest.raises(tlog.LogFormatError):
        tlog.parse_tile_path(path)


def test_c2sp_signed_note_example() -> None:
    """signed-note's example vkey verifies its example note; a changed text or another key does not."""
    verifier = tlog.parse_vkey("example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k")
    note = "This is an example message.\n\n\u2014 example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n".encode()
    assert tlog.open_note(note, verifier) == b"This is an example message.\n"
    assert verifier.vkey == "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
    with pytest.raises(tlog.LogVerificationError):
        tlog.open_note(note.replace(b"example message", b"exemplary message"), verifier)
    other = tlog.NoteVerifier.from_public_key("example.com/foo", bytes(32))
    with pytest.raises(tlog.LogVerificationError):
        tlog.open_note(note, other)


@pytest.mark.parametrize("vkey", ["example.com/foo+530d903b+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k", "example.com/foo+530d903a+AukyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k",
                                  "example.com/foo+530d903a", "+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k", "example.com/foo+530d903a+!!"])
def test_bad_vkeys(vkey: str) -> None:
    """A vkey whose ID does not match, of another type, or malformed is refused."""
    with pytest.raises(tlog.LogFormatError):
        tlog.parse_vkey(vkey)


def _signer() -> tuple[Ed25519PrivateKey, tlog.NoteVerifier]:
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return key, tlog.NoteVerifier.from_public_key("log.example/log", raw)


def test_checkpoint_and_proof_round_trip() -> None:
    """A checkpoint signed as a note, a tlog-proof of an entry in it: both verify; a wrong entry, key or origin does not."""
    key, verifier = _signer()
    log = grown(1000, seed=4)
    entries = [hashlib.sha256(str(i).encode()).digest() for i in range(1000)]
    checkpoint = tlog.Checkpoint("log.example/log", 1000, tlog.TileHashes(log.read, 1000).root())
    assert checkpoint.text() == f"log.example/log\n1000\n{base64.b64encode(checkpoint.root).decode()}\n".encode()
    note = tlog.sign_note(checkpoint.text(), name=verifier.name, public_key=verifier.public_key, sign=key.sign)
    assert tlog.open_checkpoint(note, verifier) == checkpoint
    proof = tlog.TlogProof(index=777, path=tuple(tlog.TileHashes(log.read, 1000).inclusion_proof(777)), checkpoint=note).text()
    assert proof.startswith(b"c2sp.org/tlog-proof@v1\nindex 777\n")
    assert tlog.verify_proof(proof, entry=entries[777], verifier=verifier) == checkpoint
    with pytest.raises(tlog.LogVerificationError):
        tlog.verify_proof(proof, entry=entries[778], verifier=verifier)
    with pytest.raises(tlog.LogVerificationError):
        tlog.verify_proof(proof, entry=entries[777], verifier=tlog.NoteVerifier.from_public_key("log.example/log", bytes(32)))
    elsewhere = tlog.NoteVerifier.from_public_key("other.example/log", verifier.public_key)
    renamed = tlog.sign_note(tlog.Checkpoint("log.example/log", 1000, checkpoint.root).text(), name=elsewhere.name, public_key=elsewhere.public_key, sign=key.sign)
    with pytest.raises(tlog.LogVerificationError):
        tlog.open_checkpoint(renamed, elsewhere)
    assert tlog.parse_proof(proof).path == tuple(tlog.TileHashes(log.read, 1000).inclusion_proof(777))
    for broken in (proof.replace(b"index 777", b"index 0777"), proof.replace(b"c2sp.org", b"c2sp.com"), proof.split(b"\n\n")[0], b"\xff" + proof):
        with pytest.raises(tlog.LogFormatError):
            tlog.verify_proof(broken, entry=entries[777], verifier=verifier)


def test_consistency_from_served_tiles() -> None:
    """prove_consistency: a grown log is consistent with its earlier checkpoint; a rewritten one is not."""
    log = grown(600, seed=5)
    old = tlog.Checkpoint("o", 300, tlog.root_of_leaves(log.leaves[:300]))
    new = tlog.Checkpoint("o", 600, tlog.root_of_leaves(log.leaves))
    tlog.prove_consistency(log.read, old=old, new=new)
    forged = tlog.Checkpoint("o", 300, hashlib.sha256(b"forged").digest())
    with pytest.raises(tlog.LogVerificationError):
        tlog.prove_consistency(log.read, old=forged, new=new)
    with pytest.raises(tlog.LogVerificationError):
        tlog.prove_consistency(log.read, old=new, new=old)


def test_entry_bundles() -> None:
    """Entries as big-endian uint16 length and bytes; a truncated bundle is refused."""
    entries = [bytes([i]) * 32 for i in range(3)]
    bundle = tlog.entry_bundle(entries)
    assert bundle[:2] == b"\x00\x20" and len(bundle) == 3 * 34
    assert tlog.parse_entry_bundle(bundle) == entries
    with pytest.raises(tlog.LogFormatError):
        tlog.parse_entry_bundle(bundle[:-1])


SHARED = json.loads((Path(__file__).parent / "vectors" / "tlog.json").read_text())["vectors"]


@pytest.mark.parametrize("vector", SHARED, ids=lambda v: v["name"])
def test_shared_vectors(vector: dict[str, Any]) -> None:
    """The vectors the portal's tlog.js is held to (tests/test_portal_log.py): the same outcome here."""
    proof = base64.b64decode(vector["proof_b64"])
    seal = vector["seal_json"].encode()
    if vector["result"] == "ok":
        verifier = tlog.parse_vkey(vector["vkey"])
        checkpoint = tlog.verify_proof(proof, entry=tlog.entry_hash(seal), verifier=verifier)
        assert f"entry {tlog.parse_proof(proof).index + 1} of {checkpoint.size}" == vector["logged"]
        return
    expected = tlog.LogFormatError if vector["result"] == "format" else tlog.LogVerificationError
    with pytest.raises(expected):
        tlog.verify_proof(proof, entry=tlog.entry_hash(seal), verifier=tlog.parse_vkey(vector["vkey"]))

"""The seal log's formats, once for the service, gbx and (mirrored in portal/tlog.js) the portal.

RFC 6962 / RFC 9162 Merkle hashing with inclusion and consistency proofs; C2SP tlog-tiles paths and tile maths
(proofs and roots computed from tiles, and tiles grown by appending leaves); C2SP signed-note with Ed25519
(signature type 0x01) and its verifier keys (vkeys); C2SP tlog-checkpoint; C2SP tlog-proof. Pure functions on the
standard library and `cryptography` (Ed25519 is never done by hand): no Firestore, KMS or HTTP.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

HASH_SIZE = 32
TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT  # 256 hashes per full tile
ENTRIES = "entries"  # the "level" of entry bundles in tile paths
SIG_ED25519 = 0x01
PROOF_HEADER = "c2sp.org/tlog-proof@v1"
EMPTY_ROOT = hashlib.sha256(b"").digest()
# Bounds on what a verifier reads: a note of at most this many bytes and signatures, a proof of at most 64 hashes.
MAX_NOTE_BYTES = 16 * 1024
MAX_SIGNATURES = 16
MAX_PROOF_HASHES = 64

# A tile reader: (level, index, width) -> exactly width * 32 bytes (width * 34 for entry bundles), or raises.
TileReader = Callable[[int, int, int], bytes]


class LogFormatError(ValueError):
    """Bytes that are not a well-formed note, checkpoint, vkey, tile path or proof."""


class LogVerificationError(ValueError):
    """A well-formed proof, note or checkpoint that does not verify."""


# ---------------------------------------------------------------------------------------------- hashing (RFC 6962)


def entry_hash(seal_json: bytes) -> bytes:
    """The seal log's entry for a seal: SHA-256 of the exact seal.json bytes (the log holds hashes only)."""
    return hashlib.sha256(seal_json).digest()


def leaf_hash(entry: bytes) -> bytes:
    """RFC 6962 leaf hash: SHA-256(0x00 || entry)."""
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962 interior node hash: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n > 1): where RFC 6962 splits a tree of n leaves."""
    return 1 << ((n - 1).bit_length() - 1)


def root_of_leaves(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH of a list of leaf hashes, by the RFC's recursion (a reference for tests and small trees)."""
    if not leaf_hashes:
        return EMPTY_ROOT
    if len(leaf_hashes) == 1:
        return leaf_hashes[0]
    k = _split(len(leaf_hashes))
    return node_hash(root_of_leaves(leaf_hashes[:k]), root_of_leaves(leaf_hashes[k:]))


def verify_inclusion(*, index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes) -> None:
    """RFC 9162 §2.1.3.2: raise LogVerificationError unless `proof` puts `leaf` at `index` of the tree of `size` with `root`."""
    if not 0 <= index < size:
        raise LogVerificationError(f"index {index} is not in a tree of {size} entries")
    if len(leaf) != HASH_SIZE or len(root) != HASH_SIZE:
        raise LogVerificationError("a leaf hash and a root are 32 bytes")
    fn, sn = index, size - 1
    r = leaf
    for p in proof:
        if len(p) != HASH_SIZE or sn == 0:
            raise LogVerificationError("the inclusion proof has a malformed or extra hash")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise LogVerificationError("the inclusion proof is too short")
    if r != root:
        raise LogVerificationError("the inclusion proof does not lead to the checkpoint's root")


def verify_consistency(*, size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes) -> None:
    """RFC 9162 §2.1.4.2: raise LogVerificationError unless the tree of `size1` and `root1` is a prefix of the one of `size2` and `root2`."""
    if not 0 <= size1 <= size2:
        raise LogVerificationError(f"a tree of {size1} entries cannot be a prefix of one of {size2}")
    if size1 == 0:
        # Every tree extends the empty one: a proof from it proves nothing, so none is accepted (as transparency-dev/merkle).
        raise LogVerificationError("there is no consistency proof from the empty tree")
    if size1 == size2:
        if proof:
            raise LogVerificationError("a consistency proof between equal sizes must be empty")
        if root1 != root2:
            raise LogVerificationError("two checkpoints of one size have different roots")
        return
    if not proof or any(len(p) != HASH_SIZE for p in proof):
        raise LogVerificationError("the consistency proof is empty or has a malformed hash")
    path = list(proof)
    if size1 & (size1 - 1) == 0:  # a power of two: the old root is the first node of the path
        path.insert(0, root1)
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise LogVerificationError("the consistency proof is too long")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise LogVerificationError("the consistency proof is too short")
    if fr != root1 or sr != root2:
        raise LogVerificationError("the consistency proof does not join the two checkpoints' roots")


# ---------------------------------------------------------------------------------------------- tiles (C2SP tlog-tiles)


def tile_width(level: int, index: int, size: int) -> int:
    """How many hashes tile `index` at `level` holds in a tree of `size` entries: 256, fewer (partial), or 0 (no such tile)."""
    stored = size >> (TILE_HEIGHT * level)  # hashes at this level: one per complete subtree of 256**level entries
    return max(0, min(TILE_WIDTH, stored - index * TILE_WIDTH))


def tile_path(level: int | str, index: int, width: int = TILE_WIDTH) -> str:
    """`tile/<L>/<N>[.p/<W>]` (or `tile/entries/...`), with <N> in zero-padded groups of three digits, all but the last `x`-prefixed."""
    groups = [f"{index % 1000:03d}"]
    index //= 1000
    while index:
        groups.insert(0, f"x{index % 1000:03d}")
        index //= 1000
    path = f"tile/{level}/{'/'.join(groups)}"
    return path if width == TILE_WIDTH else f"{path}.p/{width}"


_TILE_PATH = re.compile(r"tile/(0|[1-9][0-9]?|entries)/((?:x[0-9]{3}/)*)([0-9]{3})(?:\.p/([1-9][0-9]{0,2}))?")


def parse_tile_path(path: str) -> tuple[int | str, int, int]:
    """(level or "entries", index, width) of a tile path; LogFormatError for anything tlog-tiles does not name."""
    match = _TILE_PATH.fullmatch(path)
    if match is None:
        raise LogFormatError("not a tile path: tile/<L>/<N>[.p/<W>] with <N> as x001/x234/067")
    level_text, prefix, last, width_text = match.groups()
    level: int | str = level_text if level_text == ENTRIES else int(level_text)
    if isinstance(level, int) and level > 63:
        raise LogFormatError("a tile level is at most 63")
    groups = [g[1:] for g in prefix.split("/") if g] + [last]
    if len(groups) > 1 and groups[0] == "000":
        raise LogFormatError("a tile index has no leading zero groups")
    index = int("".join(groups))
    width = TILE_WIDTH if width_text is None else int(width_text)
    if width_text is not None and not 1 <= width < TILE_WIDTH:
        raise LogFormatError("a partial tile's width is 1 to 255")
    return level, index, width


def entry_bundle(entries: Sequence[bytes]) -> bytes:
    """An entry bundle: each entry as a big-endian uint16 length and its bytes."""
    return b"".join(len(e).to_bytes(2, "big") + e for e in entries)


def parse_entry_bundle(data: bytes) -> list[bytes]:
    """The entries of an entry bundle; LogFormatError when it does not split exactly."""
    entries, i = [], 0
    while i < len(data):
        if i + 2 > len(data):
            raise LogFormatError("an entry bundle ends inside a length")
        n = int.from_bytes(data[i : i + 2], "big")
        if i + 2 + n > len(data):
            raise LogFormatError("an entry bundle ends inside an entry")
        entries.append(data[i + 2 : i + 2 + n])
        i += 2 + n
    return entries


def _hashes(data: bytes) -> list[bytes]:
    return [data[i : i + HASH_SIZE] for i in range(0, len(data), HASH_SIZE)]


def _reduce(hashes: list[bytes]) -> bytes:
    """The root of a perfect subtree from its 2**k bottom hashes."""
    while len(hashes) > 1:
        hashes = [node_hash(hashes[i], hashes[i + 1]) for i in range(0, len(hashes), 2)]
    return hashes[0]


class TileHashes:
    """Merkle tree hashes of a tree of `size` entries, read from its tiles (each tile read once, then kept)."""

    def __init__(self, read_tile: TileReader, size: int) -> None:
        """Read tiles through `read_tile(level, index, width)`."""
        self.size = size
        self._read_tile = read_tile
        self._tiles: dict[tuple[int, int], list[bytes]] = {}

    @property
    def tiles_read(self) -> int:
        """How many tiles were read so far."""
        return len(self._tiles)

    def _tile(self, level: int, index: int) -> list[bytes]:
        key = (level, index)
        if key not in self._tiles:
            width = tile_width(level, index, self.size)
            if width == 0:
                raise LogVerificationError(f"tile {level}/{index} is beyond a tree of {self.size} entries")
            data = self._read_tile(level, index, width)
            if len(data) != width * HASH_SIZE:
                raise LogFormatError(f"tile {tile_path(level, index, width)} has {len(data)} bytes, not {width * HASH_SIZE}")
            self._tiles[key] = _hashes(data)
        return self._tiles[key]

    def node(self, height: int, k: int) -> bytes:
        """MTH of the perfect subtree of 2**height entries starting at entry k * 2**height (it must be inside the tree)."""
        level, rest = divmod(height, TILE_HEIGHT)
        first = k << rest  # its first hash among the stored hashes of `level`
        tile = self._tile(level, first // TILE_WIDTH)
        offset = first % TILE_WIDTH
        hashes = tile[offset : offset + (1 << rest)]
        if len(hashes) != 1 << rest:
            raise LogVerificationError("a subtree is beyond the tiles of this tree")
        return _reduce(hashes)

    def range_hash(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]) for a range that RFC 6962's recursion reaches (start aligned to the range's split)."""
        n = end - start
        if n == 0:
            return EMPTY_ROOT
        if n & (n - 1) == 0 and start % n == 0:
            return self.node(n.bit_length() - 1, start // n)
        k = _split(n)
        return node_hash(self.range_hash(start, start + k), self.range_hash(start + k, end))

    def root(self) -> bytes:
        """The root of the whole tree."""
        return self.range_hash(0, self.size)

    def inclusion_proof(self, index: int) -> list[bytes]:
        """RFC 6962 PATH(index, D[0:size]), leaf sibling first."""
        if not 0 <= index < self.size:
            raise LogVerificationError(f"index {index} is not in a tree of {self.size} entries")
        proof: list[bytes] = []
        start, end = 0, self.size
        while end - start > 1:
            k = _split(end - start)
            if index < start + k:
                proof.append(self.range_hash(start + k, end))
                end = start + k
            else:
                proof.append(self.range_hash(start, start + k))
                start += k
        return proof[::-1]

    def consistency_proof(self, size1: int) -> list[bytes]:
        """RFC 6962 PROOF(size1, D[0:size])."""
        if not 0 < size1 <= self.size:
            raise LogVerificationError(f"no consistency proof from {size1} to {self.size} entries")
        proof: list[bytes] = []
        m, start, end, whole = size1, 0, self.size, True  # whole: still on the left edge (RFC 6962's b)
        while m != end:
            k = _split(end - start)
            if m - start <= k:
                proof.append(self.range_hash(start + k, end))
                end = start + k
            else:
                proof.append(self.range_hash(start, start + k))
                start += k
                whole = False
        if not whole:
            proof.append(self.range_hash(start, end))
        return proof[::-1]


def append_to_tiles(read_tile: TileReader, size: int, leaf_hashes: Sequence[bytes]) -> dict[tuple[int, int], bytes]:
    """The hash tiles that change when `leaf_hashes` are appended to a tree of `size` entries: {(level, index): the tile's new bytes}.

    Level 0 takes the leaf hashes; each level-l tile that becomes full adds its subtree's root to level l + 1.
    """
    changed: dict[tuple[int, int], bytearray] = {}
    new_hashes, start, level = list(leaf_hashes), size, 0
    while new_hashes:
        for j, h in enumerate(new_hashes):
            position = start + j
            key = (level, position // TILE_WIDTH)
            if key not in changed:
                width = position % TILE_WIDTH
                changed[key] = bytearray(read_tile(level, key[1], width) if width else b"")
                if len(changed[key]) != width * HASH_SIZE:
                    raise LogFormatError(f"tile {level}/{key[1]} has {len(changed[key])} bytes, not {width * HASH_SIZE}")
            changed[key] += h
        end = start + len(new_hashes)
        full = range(start // TILE_WIDTH, end // TILE_WIDTH)
        new_hashes = [_reduce(_hashes(bytes(changed[(level, t)]))) for t in full]
        start, level = start // TILE_WIDTH, level + 1
    return {key: bytes(data) for key, data in changed.items()}


# ---------------------------------------------------------------------------------------------- signed notes (C2SP signed-note)


def key_id(name: str, public_key: bytes, sig_type: int = SIG_ED25519) -> bytes:
    """SHA-256(key name || 0x0A || signature type || public key)[:4]."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([sig_type]) + public_key).digest()[:4]


def _check_key_name(name: str) -> None:
    if not name or any(c.isspace() or c == "+" for c in name):
        raise LogFormatError("a key name is non-empty, without spaces or '+'")


@dataclass(frozen=True)
class NoteVerifier:
    """An Ed25519 note verifier key: its name, key ID and 32-byte public key."""

    name: str
    key_id: bytes
    public_key: bytes

    @classmethod
    def from_public_key(cls, name: str, public_key: bytes) -> NoteVerifier:
        """The verifier of an Ed25519 public key under `name`."""
        _check_key_name(name)
        if len(public_key) != 32:
            raise LogFormatError("an Ed25519 public key is 32 bytes")
        return cls(name=name, key_id=key_id(name, public_key), public_key=public_key)

    @property
    def vkey(self) -> str:
        """`name+hex(key ID)+base64(0x01 || public key)`."""
        return f"{self.name}+{self.key_id.hex()}+{base64.b64encode(bytes([SIG_ED25519]) + self.public_key).decode()}"

    def verify(self, text: bytes, signature: bytes) -> bool:
        """Whether `signature` (without its key ID) is this key's Ed25519 signature of `text`."""
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(signature, text)
        except (InvalidSignature, ValueError):
            return False
        return True


def parse_vkey(vkey: str) -> NoteVerifier:
    """A verifier key `name+hexid+base64(type||key)`; LogFormatError unless it is a consistent Ed25519 vkey."""
    parts = vkey.strip().split("+", 2)  # base64 may hold "+" too
    if len(parts) != 3 or not re.fullmatch(r"[0-9a-f]{8}", parts[1]):
        raise LogFormatError("a vkey is name+<8 hex digits>+<base64>")
    name, hex_id, material = parts
    _check_key_name(name)
    try:
        raw = base64.b64decode(material, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise LogFormatError("a vkey's key is not base64") from exc
    if len(raw) != 33 or raw[0] != SIG_ED25519:
        raise LogFormatError("only Ed25519 vkeys (type 0x01, 32 bytes) are supported")
    verifier = NoteVerifier.from_public_key(name, raw[1:])
    if verifier.key_id.hex() != hex_id:
        raise LogFormatError("the vkey's key ID does not match its name and key")
    return verifier


@dataclass(frozen=True)
class NoteSignature:
    """One signature line of a note."""

    name: str
    key_id: bytes
    signature: bytes


def sign_note(text: bytes, *, name: str, public_key: bytes, sign: Callable[[bytes], bytes]) -> bytes:
    """A signed note of `text` (ending in a newline) with one Ed25519 signature made by `sign` (64 bytes)."""
    if not text.endswith(b"\n"):
        raise LogFormatError("a note's text ends in a newline")
    _check_key_name(name)
    signature = sign(text)
    if len(signature) != 64:
        raise LogFormatError("an Ed25519 signature is 64 bytes")
    line = base64.b64encode(key_id(name, public_key) + signature).decode()
    return text + b"\n" + f"\u2014 {name} {line}\n".encode()


def split_note(note: bytes) -> tuple[bytes, list[NoteSignature]]:
    """The text and signature lines of a signed note; LogFormatError when it is not one."""
    if len(note) > MAX_NOTE_BYTES:
        raise LogFormatError("the note is too large")
    try:
        decoded = note.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LogFormatError("a note is UTF-8") from exc
    if any(ord(c) < 0x20 and c != "\n" for c in decoded):
        raise LogFormatError("a note has no control characters but newlines")
    cut = note.rfind(b"\n\n")
    if cut < 0 or not note.endswith(b"\n"):
        raise LogFormatError("a signed note is text, a blank line and signature lines")
    text, lines = note[: cut + 1], note[cut + 2 :].decode().split("\n")[:-1]
    if not lines or len(lines) > MAX_SIGNATURES:
        raise LogFormatError("a signed note has 1 to 16 signature lines")
    signatures = []
    for line in lines:
        match = re.fullmatch(r"\u2014 (\S+) ([A-Za-z0-9+/=]+)", line)
        if match is None:
            raise LogFormatError("a signature line is '\u2014 name base64'")
        try:
            raw = base64.b64decode(match.group(2), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise LogFormatError("a signature is not base64") from exc
        if len(raw) < 5:
            raise LogFormatError("a signature is a key ID and at least one byte")
        signatures.append(NoteSignature(name=match.group(1), key_id=raw[:4], signature=raw[4:]))
    return text, signatures


def open_note(note: bytes, verifier: NoteVerifier) -> bytes:
    """The text of a note that `verifier` signed; LogVerificationError when its signature is missing or wrong."""
    text, signatures = split_note(note)
    mine = [s for s in signatures if s.name == verifier.name and s.key_id == verifier.key_id]
    if not mine:
        raise LogVerificationError(f"the note is not signed by {verifier.name}+{verifier.key_id.hex()}")
    if not all(verifier.verify(text, s.signature) for s in mine):
        raise LogVerificationError("the log's signature on the note does not verify")
    return text


# ---------------------------------------------------------------------------------------------- checkpoints (C2SP tlog-checkpoint)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint's text: the log's origin, its tree size and root hash."""

    origin: str
    size: int
    root: bytes

    def text(self) -> bytes:
        """`origin\\nsize\\nbase64(root)\\n` (no extension lines)."""
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n".encode()


def parse_checkpoint(text: bytes) -> Checkpoint:
    """A checkpoint from a note's text (extension lines are allowed and ignored); LogFormatError otherwise."""
    lines = text.decode("utf-8", errors="replace").split("\n")
    if len(lines) < 4 or lines[-1] != "" or any(not line for line in lines[:-1]):
        raise LogFormatError("a checkpoint is origin, size and root hash lines")
    origin, size_text, root_text = lines[:3]
    if not re.fullmatch(r"0|[1-9][0-9]{0,19}", size_text):
        raise LogFormatError("a checkpoint's size is a decimal number without leading zeros")
    try:
        root = base64.b64decode(root_text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise LogFormatError("a checkpoint's root is not base64") from exc
    if len(root) != HASH_SIZE:
        raise LogFormatError("a checkpoint's root is 32 bytes")
    return Checkpoint(origin=origin, size=int(size_text), root=root)


def open_checkpoint(note: bytes, verifier: NoteVerifier) -> Checkpoint:
    """The checkpoint of a signed note, verified: signed by `verifier`, whose name must be the checkpoint's origin."""
    checkpoint = parse_checkpoint(open_note(note, verifier))
    if checkpoint.origin != verifier.name:
        raise LogVerificationError(f"the checkpoint's origin {checkpoint.origin!r} is not the log's {verifier.name!r}")
    return checkpoint


# ---------------------------------------------------------------------------------------------- proofs (C2SP tlog-proof)


@dataclass(frozen=True)
class TlogProof:
    """A tlog-proof: an entry's index, its inclusion path and the signed checkpoint it leads to."""

    index: int
    path: tuple[bytes, ...]
    checkpoint: bytes  # the signed note, verbatim
    extra: bytes | None = None

    def text(self) -> bytes:
        """The proof's text, `c2sp.org/tlog-proof@v1` first."""
        lines = [PROOF_HEADER]
        if self.extra is not None:
            lines.append("extra " + base64.b64encode(self.extra).decode())
        lines.append(f"index {self.index}")
        lines += [base64.b64encode(h).decode() for h in self.path]
        return ("\n".join(lines) + "\n\n").encode() + self.checkpoint


def parse_proof(data: bytes) -> TlogProof:
    """A tlog-proof's parts; LogFormatError when it is not one."""
    head, sep, checkpoint = data.partition(b"\n\n")
    if not sep:
        raise LogFormatError("a tlog-proof has its proof lines, an empty line and the checkpoint")
    try:
        lines = head.decode("ascii").split("\n")
    except UnicodeDecodeError as exc:
        raise LogFormatError("a tlog-proof's proof lines are ASCII") from exc
    if lines[0] != PROOF_HEADER:
        raise LogFormatError(f"a tlog-proof starts with {PROOF_HEADER}")
    rest = lines[1:]
    extra = None
    if rest and rest[0].startswith("extra "):
        try:
            extra = base64.b64decode(rest.pop(0)[6:], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise LogFormatError("the extra line is not base64") from exc
    if not rest or not re.fullmatch(r"index (0|[1-9][0-9]{0,19})", rest[0]):
        raise LogFormatError("a tlog-proof names its index: 'index N'")
    index = int(rest[0][6:])
    if len(rest) - 1 > MAX_PROOF_HASHES:
        raise LogFormatError("the inclusion proof is too long")
    path = []
    for line in rest[1:]:
        try:
            h = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise LogFormatError("an inclusion proof line is not base64") from exc
        if len(h) != HASH_SIZE:
            raise LogFormatError("an inclusion proof hash is 32 bytes")
        path.append(h)
    return TlogProof(index=index, path=tuple(path), checkpoint=checkpoint, extra=extra)


def verify_proof(data: bytes, *, entry: bytes, verifier: NoteVerifier) -> Checkpoint:
    """Verify a tlog-proof of `entry` (a seal's entry: SHA-256 of its seal.json) against the log's key; the checkpoint it proves inclusion in.

    LogFormatError for a malformed proof, LogVerificationError for one that does not verify.
    """
    proof = parse_proof(data)
    checkpoint = open_checkpoint(proof.checkpoint, verifier)
    verify_inclusion(index=proof.index, size=checkpoint.size, leaf=leaf_hash(entry), proof=proof.path, root=checkpoint.root)
    return checkpoint


def prove_consistency(read_tile: TileReader, *, old: Checkpoint, new: Checkpoint) -> None:
    """Check from the tiles of `new`'s tree that `old` is a prefix of it; LogVerificationError for a fork or rewritten history."""
    if old.origin != new.origin:
        raise LogVerificationError("the two checkpoints are of different logs")
    if new.size < old.size:
        raise LogVerificationError(f"the log shrank from {old.size} to {new.size} entries")
    if old.size == new.size:
        if old.root != new.root:
            raise LogVerificationError(f"two checkpoints of {old.size} entries have different roots: a split view")
        return
    tiles = TileHashes(read_tile, new.size)
    if tiles.root() != new.root:
        raise LogVerificationError("the log's tiles do not hash to its latest checkpoint's root")
    if old.size:
        verify_consistency(size1=old.size, size2=new.size, proof=tiles.consistency_proof(old.size), root1=old.root, root2=new.root)

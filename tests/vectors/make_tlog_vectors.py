"""Writes tlog.json beside it, the seal log vectors shared by gbx_client.tlog and the portal's tlog.js: `.venv/bin/python -m tests.vectors.make_tlog_vectors`."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gbx_client import tlog

OUT = Path(__file__).resolve().parent / "tlog.json"
ORIGIN = "gbx.example/log"
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
SIZE = 300


def public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


seals = [f'{{"seal_id":"vector-seal-{i:04d}","v":1}}'.encode() for i in range(SIZE)]
tiles: dict[tuple[int, int], bytes] = {}


def read(level: int, index: int, width: int) -> bytes:
    return tiles[(level, index)][: width * 32]


tiles.update(tlog.append_to_tiles(read, 0, [tlog.leaf_hash(tlog.entry_hash(s)) for s in seals]))
hashes = tlog.TileHashes(read, SIZE)
verifier = tlog.NoteVerifier.from_public_key(ORIGIN, public(KEY))
checkpoint = tlog.Checkpoint(ORIGIN, SIZE, hashes.root())
note = tlog.sign_note(checkpoint.text(), name=ORIGIN, public_key=public(KEY), sign=KEY.sign)
vectors: list[dict[str, object]] = []


def proof_of(index: int, *, path: list[bytes] | None = None, note_bytes: bytes = note) -> bytes:
    return tlog.TlogProof(index=index, path=tuple(hashes.inclusion_proof(index) if path is None else path), checkpoint=note_bytes).text()


def add(name: str, proof: bytes, seal: bytes, result: str, vkey: str = verifier.vkey, index: int | None = None) -> None:
    vector: dict[str, object] = {"name": name, "proof_b64": base64.b64encode(proof).decode(), "seal_json": seal.decode(), "vkey": vkey, "result": result}
    if result == "ok":
        vector["logged"] = f"entry {index + 1} of {SIZE}" if index is not None else ""
    vectors.append(vector)


for i in (0, 1, 2, 254, 255, 256, 257, 299):
    add(f"entry {i}", proof_of(i), seals[i], "ok", index=i)
good = proof_of(77)
path = hashes.inclusion_proof(77)
add("another seal's proof", good, seals[78], "verification")
add("index off by one", proof_of(78, path=path), seals[77], "verification")
flipped = [bytes([path[1][0] ^ 1]) + path[1][1:] if k == 1 else h for k, h in enumerate(path)]
add("a path hash flipped", proof_of(77, path=flipped), seals[77], "verification")
add("a path hash missing", proof_of(77, path=path[:-1]), seals[77], "verification")
add("a path hash too many", proof_of(77, path=[*path, path[0]]), seals[77], "verification")
forged = tlog.sign_note(checkpoint.text(), name=ORIGIN, public_key=public(OTHER), sign=OTHER.sign)
add("checkpoint signed by another key", proof_of(77, note_bytes=forged), seals[77], "verification")
bad_sig = note[:-10] + (b"A" if note[-10:-9] != b"A" else b"B") + note[-9:]
add("checkpoint signature damaged", proof_of(77, note_bytes=bad_sig), seals[77], "verification")
bigger = tlog.sign_note(tlog.Checkpoint(ORIGIN, SIZE + 1, checkpoint.root).text(), name=ORIGIN, public_key=public(KEY), sign=KEY.sign)
add("checkpoint of another size", proof_of(299, note_bytes=bigger), seals[299], "verification")
elsewhere = tlog.NoteVerifier.from_public_key("other.example/log", public(KEY))
renamed = tlog.sign_note(checkpoint.text(), name=elsewhere.name, public_key=public(KEY), sign=KEY.sign)
add("checkpoint of another origin", proof_of(77, note_bytes=renamed), seals[77], "verification", vkey=elsewhere.vkey)
add("index beyond the tree", proof_of(77).replace(b"index 77", b"index 300"), seals[77], "verification")
add("wrong header", good.replace(b"c2sp.org/tlog-proof@v1", b"c2sp.org/tlog-proof@v2"), seals[77], "format")
add("index with a leading zero", good.replace(b"index 77", b"index 077"), seals[77], "format")
add("no blank line", good.replace(b"\n\n", b"\n"), seals[77], "format")
add("a path line not base64", good.replace(b"index 77\n", b"index 77\n!!!!\n"), seals[77], "format")
add("a short path hash", good.replace(b"index 77\n", b"index 77\nAAAA\n"), seals[77], "format")
add("a checkpoint without signature", good.split(b"\n\n")[0] + b"\n\n" + checkpoint.text(), seals[77], "format")
add("with an extra line", good.replace(b"c2sp.org/tlog-proof@v1\n", b"c2sp.org/tlog-proof@v1\nextra aGVsbG8=\n"), seals[77], "ok", index=77)
add("a vkey of another type", good, seals[77], "format", vkey=verifier.vkey.rsplit("+", 1)[0] + "+" + base64.b64encode(b"\x02" + public(KEY)).decode())
add("a vkey whose ID does not match", good, seals[77], "format", vkey=ORIGIN + "+00000000+" + verifier.vkey.rsplit("+", 1)[1])

OUT.write_text(json.dumps({"about": "seal log vectors: each proof checked for its seal.json against the vkey; result ok, format (malformed) or verification (does not verify)",
                           "vectors": vectors}, indent=1) + "\n")

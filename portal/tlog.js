// The seal log's proof check in the browser: a mirror of client/gbx_client/tlog.py (RFC 6962 inclusion proofs, C2SP
// signed-note with Ed25519, tlog-checkpoint and tlog-proof), held to it by the shared vectors tests/vectors/tlog.json.
// Only Web Crypto: SHA-256 and Ed25519 (never done by hand here).

const PROOF_HEADER = "c2sp.org/tlog-proof@v1";
const SIG_ED25519 = 0x01;
const HASH_SIZE = 32;
const MAX_PROOF_HASHES = 64;
const MAX_NOTE_BYTES = 16 * 1024;
const MAX_SIGNATURES = 16;

/** A proof, note, checkpoint or vkey that is not well formed (tlog.LogFormatError). */
export class LogFormatError extends Error {}
/** A well-formed one that does not verify (tlog.LogVerificationError). */
export class LogVerificationError extends Error {}

const B64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

function b64decode(text) {
  if (!B64.test(text)) throw new LogFormatError("not base64");
  return Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
}

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

function equal(a, b) {
  return a.length === b.length && a.every((byte, i) => byte === b[i]);
}

async function sha256(bytes) {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
}

/** SHA-256 of the exact seal.json bytes: the seal's entry in the log. */
export async function entryHash(sealJson) {
  return sha256(sealJson);
}

export async function leafHash(entry) {
  return sha256(concat(Uint8Array.of(0), entry));
}

export async function nodeHash(left, right) {
  return sha256(concat(Uint8Array.of(1), left, right));
}

/** RFC 9162 2.1.3.2; throws LogVerificationError unless the proof leads from the leaf to the root. */
export async function verifyInclusion(index, size, leaf, proof, root) {
  // Sizes of a log fit in a double exactly up to 2**53; BigInt keeps the bit maths exact beyond 32 bits.
  let fn = BigInt(index);
  let sn = BigInt(size) - 1n;
  if (!(index >= 0 && index < size)) throw new LogVerificationError(`index ${index} is not in a tree of ${size} entries`);
  if (leaf.length !== HASH_SIZE || root.length !== HASH_SIZE) throw new LogVerificationError("a leaf hash and a root are 32 bytes");
  let r = leaf;
  for (const p of proof) {
    if (p.length !== HASH_SIZE || sn === 0n) throw new LogVerificationError("the inclusion proof has a malformed or extra hash");
    if ((fn & 1n) === 1n || fn === sn) {
      r = await nodeHash(p, r);
      if ((fn & 1n) === 0n) {
        while (fn !== 0n && (fn & 1n) === 0n) {
          fn >>= 1n;
          sn >>= 1n;
        }
      }
    } else {
      r = await nodeHash(r, p);
    }
    fn >>= 1n;
    sn >>= 1n;
  }
  if (sn !== 0n) throw new LogVerificationError("the inclusion proof is too short");
  if (!equal(r, root)) throw new LogVerificationError("the inclusion proof does not lead to the checkpoint's root");
}

async function keyId(name, publicKey) {
  return (await sha256(concat(new TextEncoder().encode(name + "\n"), Uint8Array.of(SIG_ED25519), publicKey))).slice(0, 4);
}

function checkKeyName(name) {
  if (!name || /[\s+]/u.test(name)) throw new LogFormatError("a key name is non-empty, without spaces or '+'");
}

/** An Ed25519 vkey `name+hexid+base64(0x01 || key)`, its ID checked: {name, keyId, publicKey}. */
export async function parseVkey(vkey) {
  const first = vkey.indexOf("+");
  const second = vkey.indexOf("+", first + 1);
  if (first < 0 || second < 0 || !/^[0-9a-f]{8}$/.test(vkey.slice(first + 1, second))) throw new LogFormatError("a vkey is name+<8 hex digits>+<base64>");
  const name = vkey.slice(0, first);
  checkKeyName(name);
  let raw;
  try {
    raw = b64decode(vkey.slice(second + 1));
  } catch {
    throw new LogFormatError("a vkey's key is not base64");
  }
  if (raw.length !== 33 || raw[0] !== SIG_ED25519) throw new LogFormatError("only Ed25519 vkeys (type 0x01, 32 bytes) are supported");
  const publicKey = raw.slice(1);
  const id = await keyId(name, publicKey);
  if ([...id].map((b) => b.toString(16).padStart(2, "0")).join("") !== vkey.slice(first + 1, second)) {
    throw new LogFormatError("the vkey's key ID does not match its name and key");
  }
  return { name, keyId: id, publicKey };
}

/** The text and signature lines of a signed note (bytes). */
export function splitNote(note) {
  if (note.length > MAX_NOTE_BYTES) throw new LogFormatError("the note is too large");
  let text;
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(note);
  } catch {
    throw new LogFormatError("a note is UTF-8");
  }
  if (/[\u0000-\u0009\u000b-\u001f]/.test(text)) throw new LogFormatError("a note has no control characters but newlines");
  const cut = text.lastIndexOf("\n\n");
  if (cut < 0 || !text.endsWith("\n")) throw new LogFormatError("a signed note is text, a blank line and signature lines");
  const lines = text.slice(cut + 2).split("\n").slice(0, -1);
  if (lines.length === 0 || lines.length > MAX_SIGNATURES) throw new LogFormatError("a signed note has 1 to 16 signature lines");
  const signatures = lines.map((line) => {
    const match = /^\u2014 (\S+) ([A-Za-z0-9+/=]+)$/u.exec(line);
    if (match === null) throw new LogFormatError("a signature line is '\u2014 name base64'");
    let raw;
    try {
      raw = b64decode(match[2]);
    } catch {
      throw new LogFormatError("a signature is not base64");
    }
    if (raw.length < 5) throw new LogFormatError("a signature is a key ID and at least one byte");
    return { name: match[1], keyId: raw.slice(0, 4), signature: raw.slice(4) };
  });
  return { text: new TextEncoder().encode(text.slice(0, cut + 1)), signatures };
}

/** The checkpoint of a signed note signed by the vkey, whose name must be its origin: {origin, size, root}. */
export async function openCheckpoint(note, verifier) {
  const { text, signatures } = splitNote(note);
  const mine = signatures.filter((s) => s.name === verifier.name && equal(s.keyId, verifier.keyId));
  if (mine.length === 0) throw new LogVerificationError(`the note is not signed by ${verifier.name}`);
  const key = await crypto.subtle.importKey("raw", verifier.publicKey, { name: "Ed25519" }, false, ["verify"]);
  for (const s of mine) {
    if (!(await crypto.subtle.verify({ name: "Ed25519" }, key, s.signature, text))) {
      throw new LogVerificationError("the log's signature on the note does not verify");
    }
  }
  const lines = new TextDecoder().decode(text).split("\n");
  if (lines.length < 4 || lines[lines.length - 1] !== "" || lines.slice(0, -1).some((line) => !line)) {
    throw new LogFormatError("a checkpoint is origin, size and root hash lines");
  }
  const [origin, sizeText, rootText] = lines;
  if (!/^(0|[1-9][0-9]{0,19})$/.test(sizeText)) throw new LogFormatError("a checkpoint's size is a decimal number without leading zeros");
  let root;
  try {
    root = b64decode(rootText);
  } catch {
    throw new LogFormatError("a checkpoint's root is not base64");
  }
  if (root.length !== HASH_SIZE) throw new LogFormatError("a checkpoint's root is 32 bytes");
  if (origin !== verifier.name) throw new LogVerificationError(`the checkpoint's origin '${origin}' is not the log's '${verifier.name}'`);
  return { origin, size: Number(sizeText), root };
}

/** A tlog-proof's parts: {index, path, checkpoint (bytes)}. */
export function parseProof(data) {
  let cut = -1;
  for (let i = 0; i + 1 < data.length; i++) {
    if (data[i] === 10 && data[i + 1] === 10) {
      cut = i;
      break;
    }
  }
  if (cut < 0) throw new LogFormatError("a tlog-proof has its proof lines, an empty line and the checkpoint");
  const head = data.slice(0, cut);
  if (head.some((b) => b > 127)) throw new LogFormatError("a tlog-proof's proof lines are ASCII");
  const lines = new TextDecoder().decode(head).split("\n");
  if (lines[0] !== PROOF_HEADER) throw new LogFormatError(`a tlog-proof starts with ${PROOF_HEADER}`);
  const rest = lines.slice(1);
  if (rest.length && rest[0].startsWith("extra ")) {
    try {
      b64decode(rest.shift().slice(6));
    } catch {
      throw new LogFormatError("the extra line is not base64");
    }
  }
  if (!rest.length || !/^index (0|[1-9][0-9]{0,19})$/.test(rest[0])) throw new LogFormatError("a tlog-proof names its index: 'index N'");
  const index = Number(rest[0].slice(6));
  if (rest.length - 1 > MAX_PROOF_HASHES) throw new LogFormatError("the inclusion proof is too long");
  const path = rest.slice(1).map((line) => {
    let hash;
    try {
      hash = b64decode(line);
    } catch {
      throw new LogFormatError("an inclusion proof line is not base64");
    }
    if (hash.length !== HASH_SIZE) throw new LogFormatError("an inclusion proof hash is 32 bytes");
    return hash;
  });
  return { index, path, checkpoint: data.slice(cut + 2) };
}

/** Verify a seal's tlog-proof (bytes) for its seal.json (bytes) against the log's vkey: {index, size}, or throws. */
export async function verifyProof(data, sealJson, vkey) {
  const proof = parseProof(data);
  const checkpoint = await openCheckpoint(proof.checkpoint, await parseVkey(vkey));
  await verifyInclusion(proof.index, checkpoint.size, await leafHash(await entryHash(sealJson)), proof.path, checkpoint.root);
  return { index: proof.index, size: checkpoint.size };
}

/** `entry N of M` (N counted from 1), as gbx says it. */
export function loggedText(index, size) {
  return `entry ${index + 1} of ${size}`;
}

// The seal portal: checks a seal.svg, a verification link (BASE/v#P.S, in the address bar) or a picture of a
// seal's QR code offline in the browser, and compares outputs with its outputs_sha256.
//
// The seal format mirrors the one implementation (client/gbx_client/seal_format.py) check for check,
// with the same reason strings, and the tests run the same vectors through both. Only the standard
// library is used (DOMParser, Web Crypto, TextDecoder, DecompressionStream); nothing the person picks leaves
// the page, nor does a link's fragment (browsers never send it), and the uploaded SVG is never inserted into
// the page: everything shown is text read from its payload. Pictures are read with the browser's
// BarcodeDetector where it has one, else with ZXing-C++ compiled to WebAssembly (the npm package
// barcode-detector, vendored in QR_DECODER_DIR and loaded from this origin only when a picture needs it).

import { LogFormatError, LogVerificationError, loggedText, verifyProof } from "./tlog.js";

const SEAL_NS = "urn:gbx:seal:v1";
const SVG_NS = "http://www.w3.org/2000/svg";
const XHTML_NS = "http://www.w3.org/1999/xhtml";
const MAX_SEAL_BYTES = 256 * 1024;
const MAX_SEAL_DEPTH = 64;
const SEAL_VERSION = "1";
const SEAL_ALG = "ES256";
const SEAL_ATTRIBUTES = ["version", "alg", "key", "payload", "signature"];
const REQUIRED_CLAIMS = new Set([
  "v", "seal_id", "run_id", "principal", "project_id", "container_image", "inputs_sha256",
  "outputs_sha256", "consumed_at", "started_at", "completed_at", "issuer", "key",
]);
const OPTIONAL_CLAIMS = new Set(["run_manifest_sha256"]);
const PUBLIC_KEYS_PATH = "/api/seal/public_keys";
// The verification link, as the seal format module defines it: BASE + VERIFY_PATH + "#" + P + "." + S.
const VERIFY_PATH = "/v";
const MAX_LINK_PAYLOAD_BYTES = 16 * 1024;
const NOT_A_LINK = "not a seal verification link (BASE/v#P.S)";
const QR_NOT_A_LINK = "the picture's QR code is not a seal verification link (BASE/v#P.S)";
// Photos are scaled down to this many pixels on their long side before the QR code is searched.
const MAX_IMAGE_SIDE = 1600;
// The vendored decoder (tools/refresh-qr-decoder.sh writes this line): its folder's name carries the version,
// so Hosting caches its files for a year and a new version is a new path.
const QR_DECODER_DIR = "./vendor/barcode-detector-3.2.2/";
const IMAGE_TYPES = ["image/png", "image/jpeg", "image/webp"];
const OK = "ok";
const NOT_CHECKED = "not checked";
const CHECK_ORDER = ["document", "key", "signature"];
// Files up to this size are hashed by Web Crypto in one call; larger ones are streamed through the
// SHA-256 below, so that a multi-gigabyte output never has to fit in memory at once.
const STREAM_THRESHOLD = 16 * 1024 * 1024;
const STREAM_CHUNK = 4 * 1024 * 1024;

/** A usable-seal problem found while reading the document: the service answers these 400 invalid_seal. */
class SealDocumentInvalid extends Error {}
/** The seal element's payload is not a valid seal.json: a verification result (checks.document). */
class SealPayloadInvalid extends Error {}

// --- base64url ------------------------------------------------------------------

const B64URL = /^[A-Za-z0-9_-]*$/;

/** Decode unpadded base64url strictly: anything but the canonical text of some bytes is refused. */
function b64urlDecode(text) {
  if (typeof text !== "string" || !B64URL.test(text) || text.length % 4 === 1) {
    throw new Error("not unpadded base64url text");
  }
  const binary = atob(text.replace(/-/g, "+").replace(/_/g, "/") + "=".repeat((4 - (text.length % 4)) % 4));
  const bytes = Uint8Array.from(binary, (char) => char.charCodeAt(0));
  // Non-zero unused bits in the last character decode to the same bytes: re-encoding exposes them.
  if (b64urlEncode(bytes) !== text) {
    throw new Error("non-canonical base64url encoding");
  }
  return bytes;
}

function b64urlEncode(bytes) {
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

// --- seal.svg -------------------------------------------------------------------

/** Decode the document's bytes to text as an XML parser would: BOM, then the declared encoding. */
function decodeXmlText(bytes) {
  const fail = () => new SealDocumentInvalid("the document is not well-formed XML");
  const strict = (label, data) => {
    try {
      return new TextDecoder(label, { fatal: true, ignoreBOM: true }).decode(data);
    } catch {
      throw fail();
    }
  };
  if (bytes[0] === 0xef && bytes[1] === 0xbb && bytes[2] === 0xbf) return strict("utf-8", bytes.subarray(3));
  if (bytes[0] === 0xff && bytes[1] === 0xfe) return strict("utf-16le", bytes.subarray(2));
  if (bytes[0] === 0xfe && bytes[1] === 0xff) return strict("utf-16be", bytes.subarray(2));
  const head = String.fromCharCode(...bytes.subarray(0, 200));
  const declared = /^<\?xml\s[^>]*?encoding\s*=\s*(["'])([A-Za-z][A-Za-z0-9._-]*)\1/.exec(head);
  const label = declared ? declared[2].toLowerCase() : "utf-8";
  if (label === "utf-8" || label === "utf8") return strict("utf-8", bytes);
  if (label === "us-ascii" || label === "ascii") {
    if (bytes.some((byte) => byte > 0x7f)) throw fail();
    return strict("utf-8", bytes);
  }
  if (label === "iso-8859-1" || label === "latin-1" || label === "latin1") {
    // Not TextDecoder: its "iso-8859-1" is windows-1252, which differs from Latin-1 at 0x80-0x9F.
    let text = "";
    for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
    return text;
  }
  // The service's parser also takes the single-byte charsets Python knows; seals are always UTF-8,
  // and anything else is refused here rather than guessed at.
  throw fail();
}

/** True when the prolog (before the root element) holds a document type declaration. */
function hasDoctype(text) {
  // Skip what may precede a DOCTYPE: the XML declaration, whitespace, comments and processing instructions.
  const prolog = /^(?:[ \t\r\n]+|<\?[\s\S]*?\?>|<!--[\s\S]*?-->)*/.exec(text)[0];
  return text.startsWith("<!DOCTYPE", prolog.length);
}

/** Parse an uploaded seal.svg and return its one seal element's attributes; throw SealDocumentInvalid with the reason. */
function parseSealSvg(bytes) {
  if (bytes.length > MAX_SEAL_BYTES) {
    throw new SealDocumentInvalid(`a seal.svg is limited to ${MAX_SEAL_BYTES} bytes`);
  }
  let text = decodeXmlText(bytes);
  if (text.startsWith("\ufeff")) text = text.slice(1);
  // Refused before parsing, as the service refuses any DTD: no entity is ever expanded.
  if (hasDoctype(text)) throw new SealDocumentInvalid("the document has a DTD");
  // On a well-formedness error Chromium inserts its own <parsererror> block with an inline style into
  // the parsed (never displayed) document; under the page's CSP the console reports that style as
  // blocked. That report is expected for broken uploads and harmless.
  const doc = new DOMParser().parseFromString(text, "image/svg+xml");
  const errors = doc.getElementsByTagNameNS(XHTML_NS, "parsererror");
  if (errors.length > 0) {
    // Chromium stops at a few thousand levels, long before the service would have parsed the
    // document and refused it for its depth: report it the way the service does.
    if (/excessive (node )?nesting|excessive depth/i.test(errors[0].textContent)) {
      throw new SealDocumentInvalid("the document is nested too deeply");
    }
    throw new SealDocumentInvalid("the document is not well-formed XML");
  }
  if (doc.doctype !== null) throw new SealDocumentInvalid("the document has a DTD");
  const root = doc.documentElement;
  if (root === null || root.namespaceURI !== SVG_NS || root.localName !== "svg") {
    throw new SealDocumentInvalid("the document is not an SVG image");
  }
  const seals = findSeals(root);
  if (seals.length === 0) throw new SealDocumentInvalid("the document has no seal element");
  if (seals.length > 1) throw new SealDocumentInvalid("the document has more than one seal element");
  const seal = seals[0];
  const parent = seal.parentElement;
  if (parent === null || parent.namespaceURI !== SVG_NS || parent.localName !== "metadata") {
    throw new SealDocumentInvalid("the seal element is not inside <metadata>");
  }
  // Plain attributes only: a namespaced gbx:version does not stand in for version.
  const missing = SEAL_ATTRIBUTES.filter((name) => !seal.hasAttributeNS(null, name));
  if (missing.length > 0) {
    throw new SealDocumentInvalid(`the seal element lacks attributes: ${missing.join(", ")}`);
  }
  const element = Object.fromEntries(SEAL_ATTRIBUTES.map((name) => [name, seal.getAttributeNS(null, name)]));
  if (element.version !== SEAL_VERSION) throw new SealDocumentInvalid("unsupported seal version");
  if (element.alg !== SEAL_ALG) throw new SealDocumentInvalid("unsupported seal algorithm");
  return element;
}

/** Every seal element under root, walked with an explicit stack and refused beyond MAX_SEAL_DEPTH levels. */
function findSeals(root) {
  const found = [];
  const stack = [[root, 1]];
  while (stack.length > 0) {
    const [element, depth] = stack.pop();
    if (depth > MAX_SEAL_DEPTH) throw new SealDocumentInvalid("the document is nested too deeply");
    if (element.namespaceURI === SEAL_NS && element.localName === "seal") found.push(element);
    for (const child of element.children) stack.push([child, depth + 1]);
  }
  return found;
}

// --- seal.json --------------------------------------------------------------------

/** A JSON number as written: Python reads integers and floats apart, and so must the canonical check. */
class JsonNumber {
  constructor(lexeme) {
    this.lexeme = lexeme;
    this.isInteger = /^-?(?:0|[1-9][0-9]*)$/.test(lexeme);
  }
}

const MAX_JSON_DEPTH = 900; // Python's json gives up (RecursionError) near a thousand levels
const NUMBER = /-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?/y;

/** Parse JSON text as Python's json.loads does (numbers kept as written, objects as Maps, last duplicate wins). */
function parseJson(text) {
  let at = 0;
  const fail = () => {
    throw new SealPayloadInvalid("payload is not UTF-8 JSON");
  };
  const skipWhitespace = () => {
    while (at < text.length && " \t\n\r".includes(text[at])) at += 1;
  };
  const parseString = () => {
    at += 1; // the opening quote
    let out = "";
    for (;;) {
      if (at >= text.length) fail();
      const char = text[at];
      if (char === '"') {
        at += 1;
        return out;
      }
      if (char < " ") fail(); // control characters must be escaped
      if (char !== "\\") {
        out += char;
        at += 1;
        continue;
      }
      const escape = text[at + 1];
      const simple = { '"': '"', "\\": "\\", "/": "/", b: "\b", f: "\f", n: "\n", r: "\r", t: "\t" }[escape];
      if (simple !== undefined) {
        out += simple;
        at += 2;
      } else if (escape === "u" && /^[0-9A-Fa-f]{4}$/.test(text.slice(at + 2, at + 6))) {
        out += String.fromCharCode(parseInt(text.slice(at + 2, at + 6), 16));
        at += 6;
      } else {
        fail();
      }
    }
  };
  const parseValue = (depth) => {
    if (depth > MAX_JSON_DEPTH) fail();
    skipWhitespace();
    const char = text[at];
    if (char === "{") {
      at += 1;
      const object = new Map();
      skipWhitespace();
      if (text[at] === "}") {
        at += 1;
        return object;
      }
      for (;;) {
        skipWhitespace();
        if (text[at] !== '"') fail();
        const key = parseString();
        skipWhitespace();
        if (text[at] !== ":") fail();
        at += 1;
        object.set(key, parseValue(depth + 1));
        skipWhitespace();
        if (text[at] === ",") {
          at += 1;
        } else if (text[at] === "}") {
          at += 1;
          return object;
        } else {
          fail();
        }
      }
    }
    if (char === "[") {
      at += 1;
      const array = [];
      skipWhitespace();
      if (text[at] === "]") {
        at += 1;
        return array;
      }
      for (;;) {
        array.push(parseValue(depth + 1));
        skipWhitespace();
        if (text[at] === ",") {
          at += 1;
        } else if (text[at] === "]") {
          at += 1;
          return array;
        } else {
          fail();
        }
      }
    }
    if (char === '"') return parseString();
    for (const [word, value] of [["true", true], ["false", false], ["null", null]]) {
      if (text.startsWith(word, at)) {
        at += word.length;
        return value;
      }
    }
    NUMBER.lastIndex = at;
    const number = NUMBER.exec(text);
    if (number === null) fail(); // NaN and Infinity too: Python accepts them, the service refuses them
    at += number[0].length;
    const parsed = new JsonNumber(number[0]);
    // Python refuses to read an integer of more than 4300 digits (int_max_str_digits).
    if (parsed.isInteger && number[0].replace("-", "").length > 4300) fail();
    return parsed;
  };
  const value = parseValue(0);
  skipWhitespace();
  if (at !== text.length) fail();
  return value;
}

/** Thrown when a parsed value has no canonical form (a lone surrogate, an infinite number). */
class NotCanonical extends Error {}

const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

/** Compare strings by code point, as Python sorts them (JavaScript's default compares UTF-16 units). */
function compareCodePoints(a, b) {
  const left = Array.from(a, (char) => char.codePointAt(0));
  const right = Array.from(b, (char) => char.codePointAt(0));
  for (let i = 0; i < Math.min(left.length, right.length); i += 1) {
    if (left[i] !== right[i]) return left[i] - right[i];
  }
  return left.length - right.length;
}

/** Python's repr() of a float: the shortest round-trip digits, fixed or 1e+16 style. */
function pythonFloatRepr(value) {
  if (!Number.isFinite(value)) throw new NotCanonical(); // json.dumps(allow_nan=False)
  if (value === 0) return Object.is(value, -0) ? "-0.0" : "0.0";
  const sign = value < 0 ? "-" : "";
  const [mantissa, exponentText] = Math.abs(value).toExponential().split("e");
  const digits = mantissa.replace(".", "");
  const exponent = Number(exponentText);
  const point = exponent + 1; // where the decimal point falls after the first digit
  if (point > 16 || point < -3) {
    const fraction = digits.length > 1 ? `${digits[0]}.${digits.slice(1)}` : digits;
    const magnitude = String(Math.abs(exponent)).padStart(2, "0");
    return `${sign}${fraction}e${exponent < 0 ? "-" : "+"}${magnitude}`;
  }
  if (point <= 0) return `${sign}0.${"0".repeat(-point)}${digits}`;
  if (point >= digits.length) return `${sign}${digits}${"0".repeat(point - digits.length)}.0`;
  return `${sign}${digits.slice(0, point)}.${digits.slice(point)}`;
}

/** The canonical JSON text of a parsed value: sorted keys, no whitespace, UTF-8 kept as is (Python's json.dumps). */
function canonicalJson(value) {
  if (value === null) return "null";
  if (value === true) return "true";
  if (value === false) return "false";
  if (value instanceof JsonNumber) {
    if (value.isInteger) return value.lexeme === "-0" ? "0" : value.lexeme;
    return pythonFloatRepr(Number(value.lexeme));
  }
  if (typeof value === "string") {
    if (LONE_SURROGATE.test(value)) throw new NotCanonical(); // cannot be encoded as UTF-8
    return JSON.stringify(value); // escapes exactly what Python's json.dumps(ensure_ascii=False) escapes
  }
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(",")}]`;
  const keys = [...value.keys()].sort(compareCodePoints);
  return `{${keys.map((key) => `${canonicalJson(key)}:${canonicalJson(value.get(key))}`).join(",")}}`;
}

/** Claim names for a reason string, bounded as the service bounds them. */
function nameList(names) {
  const ordered = [...names].sort(compareCodePoints);
  const shown = ordered.slice(0, 5).map((name) => {
    const chars = Array.from(name);
    return chars.length <= 40 ? name : `${chars.slice(0, 39).join("")}\u2026`;
  });
  const more = ordered.length > 5 ? ` (and ${ordered.length - 5} more)` : "";
  return shown.join(", ") + more;
}

/** Decode a seal element's payload into [claims (a Map), seal.json bytes]; throw SealPayloadInvalid with the reason. */
function decodePayload(payload) {
  let raw;
  try {
    raw = b64urlDecode(payload);
  } catch {
    throw new SealPayloadInvalid("payload is not base64url");
  }
  let text;
  try {
    // ignoreBOM: a leading BOM is kept, and then refused by the JSON parser, as in Python.
    text = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true }).decode(raw);
  } catch {
    throw new SealPayloadInvalid("payload is not UTF-8 JSON");
  }
  const claims = parseJson(text);
  if (!(claims instanceof Map)) throw new SealPayloadInvalid("payload is not a JSON object");
  let canonical;
  try {
    canonical = canonicalJson(claims);
  } catch (error) {
    if (error instanceof NotCanonical) throw new SealPayloadInvalid("payload is not canonical JSON");
    throw error;
  }
  // Duplicate keys, whitespace, key order, escapes and number spellings all show up here.
  if (canonical !== text) throw new SealPayloadInvalid("payload is not canonical JSON");
  const names = [...claims.keys()];
  const missing = [...REQUIRED_CLAIMS].filter((name) => !claims.has(name));
  if (missing.length > 0) throw new SealPayloadInvalid(`payload lacks claims: ${nameList(missing)}`);
  const unknown = names.filter((name) => !REQUIRED_CLAIMS.has(name) && !OPTIONAL_CLAIMS.has(name));
  if (unknown.length > 0) throw new SealPayloadInvalid(`payload has unknown claims: ${nameList(unknown)}`);
  const version = claims.get("v");
  if (!(version instanceof JsonNumber) || !version.isInteger || version.lexeme !== "1") {
    throw new SealPayloadInvalid("payload version is not 1");
  }
  const notStrings = names.filter((name) => name !== "v" && typeof claims.get(name) !== "string");
  if (notStrings.length > 0) throw new SealPayloadInvalid(`payload claims are not strings: ${nameList(notStrings)}`);
  return [claims, raw];
}

// --- the verification link ------------------------------------------------------

/** Split a verification link into the site it names and its fragment; throw SealDocumentInvalid when the text is not one. */
function parseVerifyLink(text) {
  const link = text.trim();
  let url;
  try {
    url = new URL(link);
  } catch {
    throw new SealDocumentInvalid(NOT_A_LINK);
  }
  if (
    (url.protocol !== "http:" && url.protocol !== "https:") || !url.host || !url.pathname.endsWith(VERIFY_PATH)
    || url.search || !link.includes("#") || /\s/.test(link)
  ) {
    throw new SealDocumentInvalid(NOT_A_LINK);
  }
  return { site: `${url.protocol}//${url.host}${url.pathname.slice(0, -VERIFY_PATH.length)}`, fragment: link.slice(link.indexOf("#") + 1) };
}

/** Inflate a link's raw DEFLATE payload, bounded; throw SealPayloadInvalid unless it is exactly one complete stream. */
async function inflatePayload(packed) {
  // DecompressionStream errors on a truncated stream and on bytes after its end, as the service's zlib check does.
  const reader = new Blob([packed]).stream().pipeThrough(new DecompressionStream("deflate-raw")).getReader();
  const chunks = [];
  let total = 0;
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      total += value.length;
      if (total > MAX_LINK_PAYLOAD_BYTES) {
        reader.cancel().catch(() => {});
        throw new SealPayloadInvalid(`payload inflates to more than ${MAX_LINK_PAYLOAD_BYTES} bytes`);
      }
      chunks.push(value);
    }
  } catch (error) {
    if (error instanceof SealPayloadInvalid) throw error;
    throw new SealPayloadInvalid("payload does not inflate (raw DEFLATE)");
  }
  const raw = new Uint8Array(total);
  let at = 0;
  for (const chunk of chunks) {
    raw.set(chunk, at);
    at += chunk.length;
  }
  return raw;
}

/** The seal element a link's fragment P.S stands for (its key is the payload's); throw SealPayloadInvalid if it does not decode. */
async function linkElement(fragment) {
  const parts = fragment.split(".");
  if (parts.length !== 2) throw new SealPayloadInvalid("the link is damaged or incomplete (cut off when copied?): its part after # is not payload.signature");
  let packed;
  try {
    packed = b64urlDecode(parts[0]);
  } catch {
    throw new SealPayloadInvalid("payload is not base64url");
  }
  const raw = await inflatePayload(packed);
  let key = "";
  try {
    const parsed = JSON.parse(new TextDecoder("utf-8").decode(raw));
    if (parsed && typeof parsed.key === "string") key = parsed.key;
  } catch {
    // decodePayload names what is wrong with the payload.
  }
  return { version: SEAL_VERSION, alg: SEAL_ALG, key, payload: b64urlEncode(raw), signature: parts[1] };
}

// --- signature ------------------------------------------------------------------

/** Convert a strict DER ECDSA signature to the raw r‖s (32 bytes each) that Web Crypto takes; null if it is not one. */
function derToRaw(der) {
  // Strict DER, as OpenSSL (behind the service's check) requires: short-form lengths (a P-256 signature
  // is at most 72 bytes), minimal positive integers, nothing after the sequence.
  let at = 0;
  const readInteger = () => {
    if (der[at] !== 0x02) return null;
    const length = der[at + 1];
    if (length === undefined || length < 1 || length > 33 || at + 2 + length > der.length) return null;
    let value = der.subarray(at + 2, at + 2 + length);
    at += 2 + length;
    if (value[0] & 0x80) return null; // negative
    if (value[0] === 0) {
      if (value.length === 1 || !(value[1] & 0x80)) return null; // zero, or a leading zero that is not needed
      value = value.subarray(1);
    }
    if (value.length > 32) return null;
    const padded = new Uint8Array(32);
    padded.set(value, 32 - value.length);
    return padded;
  };
  if (der.length < 2 || der[0] !== 0x30 || der[1] >= 0x80 || der[1] !== der.length - 2) return null;
  at = 2;
  const r = readInteger();
  const s = r && readInteger();
  if (!r || !s || at !== der.length) return null;
  const raw = new Uint8Array(64);
  raw.set(r, 0);
  raw.set(s, 32);
  return raw;
}

/** The SPKI DER bytes of a PEM public key. */
function pemToDer(pem) {
  const body = pem.replace(/-----(BEGIN|END) PUBLIC KEY-----/g, "").replace(/\s+/g, "");
  return Uint8Array.from(atob(body), (char) => char.charCodeAt(0));
}

/** True iff the DER signature is a valid ES256 signature of data under the PEM key; never throws on bad input. */
async function verifySignature(pem, data, der) {
  const raw = derToRaw(der);
  if (raw === null) return false;
  try {
    const key = await crypto.subtle.importKey("spki", pemToDer(pem), { name: "ECDSA", namedCurve: "P-256" }, false, ["verify"]);
    return await crypto.subtle.verify({ name: "ECDSA", hash: "SHA-256" }, key, raw, data);
  } catch {
    return false;
  }
}

/** The published keys of this site, fetched fresh for every check. */
async function fetchPublicKeys() {
  const response = await fetch(PUBLIC_KEYS_PATH, { cache: "no-store", credentials: "omit", headers: { Accept: "application/json" } });
  if (!response.ok) throw new Error(`${PUBLIC_KEYS_PATH} answered ${response.status}`);
  const body = await response.json();
  if (!body || !Array.isArray(body.keys)) throw new Error(`${PUBLIC_KEYS_PATH} did not list keys`);
  return body.keys;
}

function emptyResult() {
  return { checks: { document: NOT_CHECKED, key: NOT_CHECKED, signature: NOT_CHECKED }, claims: null, refused: false, unchecked: false, site: null };
}

/** Run the offline checks in the contract's order on a seal.svg; each failure is reported and stops the later checks. */
async function verifySeal(bytes) {
  const result = emptyResult();
  let element;
  try {
    element = parseSealSvg(bytes);
  } catch (error) {
    if (!(error instanceof SealDocumentInvalid)) throw error;
    result.checks.document = error.message;
    result.refused = true; // the service answers these 400 invalid_seal: not a seal at all
    return result;
  }
  return verifyElement(element, result);
}

/** The same checks on a verification link: its fragment inflated stands for the seal element. */
async function verifyLink(text) {
  const result = emptyResult();
  let link;
  try {
    link = parseVerifyLink(text);
  } catch (error) {
    if (!(error instanceof SealDocumentInvalid)) throw error;
    result.checks.document = error.message;
    result.refused = true;
    return result;
  }
  result.site = link.site;
  let element;
  try {
    element = await linkElement(link.fragment);
  } catch (error) {
    if (!(error instanceof SealPayloadInvalid)) throw error;
    result.checks.document = error.message;
    return result;
  }
  return verifyElement(element, result);
}

/** The checks after the document is read: the payload, the key this site publishes, the signature. */
async function verifyElement(element, result) {
  const { checks } = result;
  let claims;
  let payload;
  try {
    [claims, payload] = decodePayload(element.payload);
  } catch (error) {
    if (!(error instanceof SealPayloadInvalid)) throw error;
    checks.document = error.message;
    return result;
  }
  result.claims = claims;
  result.payload = payload; // the seal log's entry is its hash
  if (claims.get("key") !== element.key) {
    checks.document = "payload key differs from the seal element's key";
    return result;
  }
  checks.document = OK;
  let keys;
  try {
    keys = await fetchPublicKeys();
  } catch (error) {
    checks.key = `could not fetch the published keys (${error.message})`;
    result.unchecked = true;
    return result;
  }
  const published = keys.find((entry) => entry && entry.key === element.key && entry.alg === SEAL_ALG && typeof entry.pem === "string");
  if (published === undefined) {
    checks.key = "key version is not trusted";
    return result;
  }
  checks.key = OK;
  let der;
  try {
    der = b64urlDecode(element.signature);
  } catch {
    checks.signature = "signature is not base64url";
    return result;
  }
  checks.signature = (await verifySignature(published.pem, payload, der)) ? OK : "signature does not match the payload";
  return result;
}

// --- outputs hash -----------------------------------------------------------------

const K256 = new Uint32Array([
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
]);

/** Incremental SHA-256 (FIPS 180-4), for files too large to hand to Web Crypto in one piece. */
class Sha256 {
  constructor() {
    this.state = new Uint32Array([0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19]);
    this.block = new Uint8Array(64);
    this.blockLength = 0;
    this.totalBytes = 0;
    this.words = new Uint32Array(64);
  }

  update(data) {
    this.totalBytes += data.length;
    let offset = 0;
    if (this.blockLength > 0) {
      const take = Math.min(64 - this.blockLength, data.length);
      this.block.set(data.subarray(0, take), this.blockLength);
      this.blockLength += take;
      offset = take;
      if (this.blockLength < 64) return;
      this.compress(this.block, 0);
      this.blockLength = 0;
    }
    for (; offset + 64 <= data.length; offset += 64) this.compress(data, offset);
    this.block.set(data.subarray(offset), 0);
    this.blockLength = data.length - offset;
  }

  digest() {
    const bits = this.totalBytes * 8;
    const padding = new Uint8Array(((this.blockLength < 56 ? 56 : 120) - this.blockLength) + 8);
    padding[0] = 0x80;
    const view = new DataView(padding.buffer);
    view.setUint32(padding.length - 8, Math.floor(bits / 0x100000000));
    view.setUint32(padding.length - 4, bits >>> 0);
    const total = this.totalBytes;
    this.update(padding);
    this.totalBytes = total;
    const out = new Uint8Array(32);
    const outView = new DataView(out.buffer);
    this.state.forEach((word, i) => outView.setUint32(i * 4, word));
    return out;
  }

  compress(data, offset) {
    const w = this.words;
    for (let i = 0; i < 16; i += 1) {
      const j = offset + i * 4;
      w[i] = (data[j] << 24) | (data[j + 1] << 16) | (data[j + 2] << 8) | data[j + 3];
    }
    for (let i = 16; i < 64; i += 1) {
      const a = w[i - 15];
      const b = w[i - 2];
      const s0 = ((a >>> 7) | (a << 25)) ^ ((a >>> 18) | (a << 14)) ^ (a >>> 3);
      const s1 = ((b >>> 17) | (b << 15)) ^ ((b >>> 19) | (b << 13)) ^ (b >>> 10);
      w[i] = (w[i - 16] + s0 + w[i - 7] + s1) | 0;
    }
    const h = this.state;
    let [a, b, c, d, e, f, g, k] = h;
    for (let i = 0; i < 64; i += 1) {
      const s1 = ((e >>> 6) | (e << 26)) ^ ((e >>> 11) | (e << 21)) ^ ((e >>> 25) | (e << 7));
      const choice = (e & f) ^ (~e & g);
      const t1 = (k + s1 + choice + K256[i] + w[i]) | 0;
      const s0 = ((a >>> 2) | (a << 30)) ^ ((a >>> 13) | (a << 19)) ^ ((a >>> 22) | (a << 10));
      const majority = (a & b) ^ (a & c) ^ (b & c);
      const t2 = (s0 + majority) | 0;
      k = g;
      g = f;
      f = e;
      e = (d + t1) | 0;
      d = c;
      c = b;
      b = a;
      a = (t1 + t2) | 0;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += k;
  }
}

function hex(bytes) {
  return Array.from(new Uint8Array(bytes), (byte) => byte.toString(16).padStart(2, "0")).join("");
}

/** SHA-256 of a file's bytes, in hex; onBytes(n) reports progress while large files stream. */
async function hashFile(file, onBytes, cancelled) {
  if (file.size <= STREAM_THRESHOLD) {
    const digest = await crypto.subtle.digest("SHA-256", await file.arrayBuffer());
    onBytes(file.size);
    return hex(digest);
  }
  const sha = new Sha256();
  for (let offset = 0; offset < file.size; offset += STREAM_CHUNK) {
    if (cancelled()) throw new Cancelled();
    const chunk = new Uint8Array(await file.slice(offset, offset + STREAM_CHUNK).arrayBuffer());
    sha.update(chunk);
    onBytes(chunk.length);
  }
  return hex(sha.digest());
}

class Cancelled extends Error {}
/** A folder the canonical hash is not defined for (names sha256sum would escape). */
class OutputsUnhashable extends Error {}

function compareBytes(a, b) {
  for (let i = 0; i < Math.min(a.length, b.length); i += 1) {
    if (a[i] !== b[i]) return a[i] - b[i];
  }
  return a.length - b.length;
}

/**
 * The canonical hash of a folder: SHA-256 of `(cd DIR && find . -type f -print0 | LC_ALL=C sort -z | xargs -0r sha256sum)`,
 * i.e. of the lines `<hex>  ./<relative path>\n` of its regular files, sorted bytewise by path.
 */
async function hashFolder(files, onProgress, cancelled) {
  const encoder = new TextEncoder();
  const entries = files.map((file) => {
    // webkitRelativePath is "<picked folder>/<path inside it>"; the listing names paths from inside it.
    const relative = file.webkitRelativePath.split("/").slice(1).join("/");
    return { file, path: `./${relative}`, bytes: encoder.encode(`./${relative}`) };
  });
  // sha256sum escapes such names, so the listing would not hold the plain path (gbx hash refuses them too).
  // Chromium shows a backslash in webkitRelativePath as "/", but keeps it in the file's own name.
  const ambiguous = /[\n\r\\]/;
  const unhashable = entries.find((entry) => ambiguous.test(entry.path) || ambiguous.test(entry.file.name));
  if (unhashable) {
    const shown = ambiguous.test(unhashable.file.name) ? unhashable.file.name : unhashable.path;
    throw new OutputsUnhashable(
      `a file name has a newline, carriage return or backslash, which the canonical hash does not allow: ${clean(JSON.stringify(shown))}`,
    );
  }
  entries.sort((a, b) => compareBytes(a.bytes, b.bytes));
  const totalBytes = entries.reduce((sum, entry) => sum + entry.file.size, 0);
  let doneBytes = 0;
  const lines = [];
  for (const [index, entry] of entries.entries()) {
    if (cancelled()) throw new Cancelled();
    const digest = await hashFile(entry.file, (n) => {
      doneBytes += n;
      onProgress({ files: index, totalFiles: entries.length, bytes: doneBytes, totalBytes });
    }, cancelled);
    lines.push(`${digest}  ${entry.path}\n`);
    onProgress({ files: index + 1, totalFiles: entries.length, bytes: doneBytes, totalBytes });
  }
  return hex(await crypto.subtle.digest("SHA-256", encoder.encode(lines.join(""))));
}

// --- page -------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);
const state = { sealRun: 0, outputsRun: 0, claims: null, verified: false, outputs: null };

// Shown as the badge shows them: the same lines in the same order, full values.
const BADGE_LINES = [
  ["Seal ID", (c) => c.get("seal_id")],
  ["Run ID", (c) => c.get("run_id")],
  ["Image", (c) => splitImage(c.get("container_image"))[0]],
  ["Digest", (c) => splitImage(c.get("container_image"))[1]],
  ["Project", (c) => c.get("project_id")],
  ["Principal", (c) => c.get("principal")],
  ["Completed", (c) => displayTime(c.get("completed_at"))],
  ["Issuer", (c) => c.get("issuer")],
];

function splitImage(image) {
  const at = typeof image === "string" ? image.lastIndexOf("@") : -1;
  return at > 0 ? [image.slice(0, at), image.slice(at + 1)] : [image, "\u2014"];
}

function displayTime(value) {
  const match = /^(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2}:\d{2})(?:\.\d+)?Z$/.exec(value);
  return match ? `${match[1]} ${match[2]} UTC` : value;
}

/** Text safe to show: controls, bidi overrides and other invisible characters replaced, as the badge does. */
function clean(value) {
  if (typeof value !== "string") return value === undefined || value === null ? "\u2014" : canonicalJson(value);
  return value === "" ? "\u2014" : value.replace(/[\p{Cc}\p{Cf}\p{Cs}\p{Co}\p{Zl}\p{Zp}\uFFFE\uFFFF]/gu, "\ufffd");
}

function fillList(list, rows) {
  list.replaceChildren();
  for (const [label, value] of rows) {
    const term = document.createElement("dt");
    term.textContent = label;
    const detail = document.createElement("dd");
    detail.textContent = clean(value);
    list.append(term, detail);
  }
}

/** Fill the checks list; `unavailable` names a check that could not be made (not one that failed). */
function showChecks(checks, unavailable = null) {
  for (const name of CHECK_ORDER) {
    const item = document.querySelector(`#checks [data-check="${name}"]`);
    const value = checks[name];
    item.dataset.result = value === OK ? "ok" : value === NOT_CHECKED ? "skipped" : name === unavailable ? "unavailable" : "failed";
    item.querySelector(".check-reason").textContent = clean(value); // reasons may quote claim names from the upload
  }
}

function showResult(result) {
  const { checks } = result;
  const verified = CHECK_ORDER.every((name) => checks[name] === OK);
  const failed = CHECK_ORDER.find((name) => checks[name] !== OK && checks[name] !== NOT_CHECKED);
  const verdict = $("verdict");
  let detail;
  if (verified) {
    verdict.textContent = "VERIFIED";
    detail = "Signed with this service’s key, and unchanged since. Checked offline in your browser.";
  } else if (result.unchecked) {
    verdict.textContent = "NOT CHECKED";
    detail = `The signature could not be checked: ${clean(checks[failed])}. Try again when the site answers.`;
  } else if (result.refused) {
    verdict.textContent = "INVALID";
    const what = result.source === "file" ? "This file is not a usable seal.svg" : "This is not a usable seal";
    detail = `${what}: ${clean(checks.document)}. Nothing else was checked.`;
  } else {
    verdict.textContent = "INVALID";
    const thing = { file: "this file", link: "this link", picture: "this picture" }[result.source] || "this seal";
    detail = `The ${failed} check failed: ${clean(checks[failed])}. Do not rely on what ${thing} says.`;
  }
  verdict.dataset.verdict = verdict.textContent;
  $("verdict-detail").textContent = detail;
  showVerifiedBy(result);
  $("result").dataset.verdict = verdict.textContent;
  showChecks(checks, result.unchecked ? failed : null);

  state.claims = result.claims;
  state.verified = verified;
  const claimsBlock = $("claims-block");
  claimsBlock.hidden = result.claims === null;
  if (result.claims !== null) {
    $("claims-trust").textContent = verified
      ? "These claims are read from the signed payload, not from the picture."
      : "Read from the payload, but NOT verified: do not rely on them.";
    claimsBlock.dataset.trusted = String(verified);
    fillList($("claims"), BADGE_LINES.map(([label, read]) => [label, read(result.claims)]));
    const names = [...result.claims.keys()].sort(compareCodePoints);
    fillList($("all-claims"), names.map((name) => [name, result.claims.get(name)]));
  }
  $("result").dataset.state = "done";
  showOutputsComparison();
  checkLog(result, state.sealRun);
}

// --- the seal log -----------------------------------------------------------------

const LOG_PROOF_PATH = "/api/log/proof";

/** After the offline checks: fetch the seal's tlog-proof and check it here (Web Crypto Ed25519 and SHA-256) against the
 * log key this site publishes; the `log` line says `entry N of M`, or why not. It never changes the verdict above. */
async function checkLog(result, run) {
  const line = $("log-line");
  if (result.checks.signature !== OK || !result.payload || !result.claims) return;
  const show = (outcome, text) => {
    if (run !== state.sealRun) return;
    line.dataset.result = outcome;
    line.querySelector(".check-reason").textContent = text;
    line.hidden = false;
  };
  show("pending", "checking the seal log…");
  line.dataset.state = "checking";
  try {
    const keys = await (await fetch(PUBLIC_KEYS_PATH, { cache: "no-store", credentials: "omit", headers: { Accept: "application/json" } })).json();
    const vkey = keys && keys.log && keys.log.vkey;
    if (typeof vkey !== "string") {
      show("unavailable", "this site publishes no log key");
    } else {
      const url = `${LOG_PROOF_PATH}?seal_id=${encodeURIComponent(String(result.claims.get("seal_id")))}`;
      const response = await fetch(url, { cache: "no-store", credentials: "omit" });
      if (response.status === 404) {
        show("failed", "not in this site's seal log");
      } else if (!response.ok) {
        show("unavailable", `the seal log did not answer (HTTP ${response.status}); try again later`);
      } else {
        const { index, size } = await verifyProof(new Uint8Array(await response.arrayBuffer()), result.payload, vkey);
        show("ok", loggedText(index, size));
      }
    }
  } catch (error) {
    if (error instanceof LogFormatError || error instanceof LogVerificationError) {
      show("failed", `the log's proof does not verify: ${error.message}`);
    } else {
      show("unavailable", `the seal log could not be checked (${error.message})`);
    }
  }
  if (run === state.sealRun) line.dataset.state = "done";
}

/** Say which site made the checks (a QR code can point anywhere) and, for a link, which site it names. */
function showVerifiedBy(result) {
  const here = `${location.protocol}//${location.host}`;
  const box = $("verified-by");
  // Nothing to say when neither a key was looked up nor a link named a site (a file that is not a seal).
  if (result.checks.key === NOT_CHECKED && result.site === null) {
    box.hidden = true;
    return;
  }
  const lines = [`Checked by ${here}, with the keys this site publishes.`];
  if (result.site !== null) {
    lines.push(result.site === here
      ? `The link names this site.`
      : `The link names another site: ${clean(result.site)}. Trust the verdict only if you trust ${here}.`);
  }
  box.textContent = lines.join(" ");
  box.dataset.site = here;
  box.dataset.linkSite = result.site === null ? "" : result.site;
  box.hidden = false;
}

/** Show that a check started: the verdict and its details cleared. */
function startCheck(description) {
  const run = ++state.sealRun;
  const result = $("result");
  result.hidden = false;
  result.dataset.state = "checking";
  result.dataset.verdict = "";
  $("verdict").textContent = "Checking…";
  $("verdict").dataset.verdict = "";
  $("verdict-detail").textContent = "";
  $("verified-by").hidden = true;
  $("log-line").hidden = true;
  $("checked-file").textContent = description;
  showChecks({ document: NOT_CHECKED, key: NOT_CHECKED, signature: NOT_CHECKED });
  $("claims-block").hidden = true;
  state.claims = null;
  state.verified = false;
  showOutputsComparison();
  return run;
}

function isImage(file) {
  return IMAGE_TYPES.includes(file.type) || /\.(png|jpe?g|webp)$/i.test(file.name);
}

async function checkSeal(file) {
  if (isImage(file)) {
    checkPicture(file);
    return;
  }
  const run = startCheck(`File: ${clean(file.name)} (${formatBytes(file.size)})`);
  let outcome;
  try {
    // Size first, before reading: nothing about an oversized upload is worth reading.
    if (file.size > MAX_SEAL_BYTES) throw new SealDocumentInvalid(`a seal.svg is limited to ${MAX_SEAL_BYTES} bytes`);
    outcome = await verifySeal(new Uint8Array(await file.arrayBuffer()));
  } catch (error) {
    const reason = error instanceof SealDocumentInvalid ? error.message : `the file could not be read (${error.message})`;
    outcome = {
      checks: { document: reason, key: NOT_CHECKED, signature: NOT_CHECKED },
      claims: null,
      refused: true,
      unchecked: false,
      site: null,
    };
  }
  outcome.source = "file";
  if (run === state.sealRun) showResult(outcome);
}

/** Check a verification link (the address bar's, or a QR code's). */
async function checkLink(text, description) {
  const run = startCheck(description);
  const outcome = await verifyLink(text);
  outcome.source = "link";
  if (run === state.sealRun) showResult(outcome);
}

/** Read the QR code in a picture (a screenshot, a photo of a print) and check the link it holds. */
async function checkPicture(file) {
  const description = `Picture: ${clean(file.name)} (${formatBytes(file.size)})`;
  const run = startCheck(description);
  let texts;
  try {
    texts = await readQrCodes(file);
  } catch (error) {
    if (run === state.sealRun) {
      showResult({ ...emptyResult(), checks: { document: `the picture could not be read (${error.message})`, key: NOT_CHECKED, signature: NOT_CHECKED }, refused: true, source: "picture" });
    }
    return;
  }
  if (run !== state.sealRun) return;
  if (texts.length !== 1) {
    const reason = texts.length === 0 ? "no QR code found in the picture" : "the picture holds more than one QR code";
    showResult({ ...emptyResult(), checks: { document: reason, key: NOT_CHECKED, signature: NOT_CHECKED }, refused: true, source: "picture" });
    return;
  }
  const outcome = await verifyLink(texts[0]);
  // Say that the code, not the picture, is the problem (gbx verify PICTURE says the same).
  if (outcome.checks.document === NOT_A_LINK) outcome.checks.document = QR_NOT_A_LINK;
  outcome.source = "picture";
  if (run === state.sealRun) showResult(outcome);
}

/** The texts of the QR codes in a picture: the browser's BarcodeDetector where it has one, else ZXing-C++. */
async function readQrCodes(file) {
  performance.mark("qr-decode-start"); // the whole read: the picture's own decoding too
  let bitmap = null;
  try {
    bitmap = await createImageBitmap(file);
    if ("BarcodeDetector" in globalThis) {
      try {
        if ((await BarcodeDetector.getSupportedFormats()).includes("qr_code")) {
          const codes = await new BarcodeDetector({ formats: ["qr_code"] }).detect(bitmap);
          if (codes.length > 0) return codes.map((code) => code.rawValue);
        }
      } catch {
        // Fall through to ZXing: a detector that is present but fails must not hide the code.
      }
    }
    const pixels = pictureData(bitmap);
    const detector = await zxingDetector();
    return (await detector.detect(pixels)).map((code) => code.rawValue);
  } finally {
    if (bitmap !== null) bitmap.close();
    performance.measure("qr-decode", "qr-decode-start");
  }
}

/** The picture's pixels, at most MAX_IMAGE_SIDE on the long side, on white (a transparent PNG reads as paper). */
function pictureData(bitmap) {
  const scale = Math.min(1, MAX_IMAGE_SIDE / Math.max(bitmap.width, bitmap.height));
  const width = Math.max(1, Math.round(bitmap.width * scale));
  const height = Math.max(1, Math.round(bitmap.height * scale));
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.fillStyle = "#ffffff";
  context.fillRect(0, 0, width, height);
  context.drawImage(bitmap, 0, 0, width, height);
  return context.getImageData(0, 0, width, height);
}

let zxingDetectorPromise = null;

/** ZXing's BarcodeDetector for QR codes: its module and .wasm loaded once, from this origin, by the first picture. */
function zxingDetector() {
  if (zxingDetectorPromise === null) {
    zxingDetectorPromise = (async () => {
      performance.mark("qr-decoder-load-start");
      const { BarcodeDetector: ZXingDetector, prepareZXingModule } = await import(`${QR_DECODER_DIR}ponyfill.js`);
      // The package would fetch its .wasm from a CDN: it comes from this deployment, next to the module.
      const wasm = new URL(`${QR_DECODER_DIR}zxing_reader.wasm`, import.meta.url).href;
      await prepareZXingModule({
        overrides: { locateFile: (path, prefix) => (path.endsWith(".wasm") ? wasm : prefix + path) },
        fireImmediately: true,
      });
      performance.measure("qr-decoder-load", "qr-decoder-load-start");
      return new ZXingDetector({ formats: ["qr_code"] });
    })();
    // A failed load (offline, say) is tried again by the next picture.
    zxingDetectorPromise.catch(() => {
      zxingDetectorPromise = null;
    });
  }
  return zxingDetectorPromise;
}

/** On /v, the address bar's fragment is a seal: check it (it never leaves the browser). */
function checkAddressBar() {
  // href, not hash: an empty fragment ("/v#") is a link too, and an unusable one.
  if (!location.pathname.endsWith(VERIFY_PATH) || !location.href.includes("#")) return;
  checkLink(location.href, "The verification link in the address bar");
}

function formatBytes(bytes) {
  const units = ["bytes", "KB", "MB", "GB", "TB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return unit === 0 ? `${bytes} bytes` : `${value.toFixed(1)} ${units[unit]}`;
}

/** Show the outputs verdict: a headline, then what it rests on. */
function setOutputsResult(match, headline, detail) {
  const box = $("outputs-result");
  box.dataset.match = match;
  if (!headline) {
    box.replaceChildren();
    return;
  }
  const strong = document.createElement("strong");
  strong.textContent = headline;
  box.replaceChildren(strong, detail ? ` ${detail}` : "");
}

function showOutputsComparison() {
  const outputs = state.outputs;
  if (outputs === null || outputs.hash === undefined) return;
  const sealed = state.claims && state.claims.get("outputs_sha256");
  $("outputs-hash").textContent = outputs.hash;
  $("sealed-hash").textContent = typeof sealed === "string" ? clean(sealed) : "no seal checked yet";
  $("outputs-hashes").hidden = false;
  if (typeof sealed !== "string") {
    setOutputsResult("unknown", `Hashed ${outputs.what}.`, "Choose a seal above to compare it with the sealed outputs.");
  } else if (sealed.toLowerCase() !== outputs.hash) {
    setOutputsResult("no", "These are NOT the sealed outputs.", `${capitalize(outputs.what)} hashes to something else than the seal’s outputs_sha256.`);
  } else if (!state.verified) {
    setOutputsResult("yes", "The hashes match, but the seal did not verify,", "so this proves nothing about these outputs.");
  } else {
    setOutputsResult("yes", "These are the sealed outputs.", `${capitalize(outputs.what)} hashes to the seal’s outputs_sha256.`);
  }
}

function capitalize(text) {
  return text.charAt(0).toUpperCase() + text.slice(1);
}

async function checkOutputs(files, kind) {
  const run = ++state.outputsRun;
  const cancelled = () => run !== state.outputsRun;
  const progressBlock = $("outputs-progress-block");
  const progress = $("outputs-progress");
  const progressText = $("outputs-progress-text");
  state.outputs = null;
  setOutputsResult("", "", "");
  $("outputs-hashes").hidden = true;
  progress.value = 0;
  progress.max = 1;
  progressText.textContent = "";
  progressBlock.hidden = false;
  let lastPaint = 0;
  const onProgress = ({ files: done, totalFiles, bytes, totalBytes }) => {
    const now = performance.now();
    if (now - lastPaint < 100 && done !== totalFiles) return;
    lastPaint = now;
    progress.max = Math.max(totalBytes, 1);
    progress.value = bytes;
    progressText.textContent = `${done} of ${totalFiles} files, ${formatBytes(bytes)} of ${formatBytes(totalBytes)}`;
  };
  try {
    let hash;
    let what;
    if (kind === "folder") {
      hash = await hashFolder(files, onProgress, cancelled);
      what = files.length === 0
        ? "an empty folder"
        : `the folder ${files[0].webkitRelativePath.split("/")[0]} (${files.length} ${files.length === 1 ? "file" : "files"})`;
    } else {
      const [file] = files;
      let bytes = 0;
      hash = await hashFile(file, (n) => {
        bytes += n;
        onProgress({ files: 0, totalFiles: 1, bytes, totalBytes: file.size });
      }, cancelled);
      onProgress({ files: 1, totalFiles: 1, bytes: file.size, totalBytes: file.size });
      what = `the file ${file.name}`;
    }
    if (cancelled()) return;
    state.outputs = { hash, what };
    showOutputsComparison();
  } catch (error) {
    if (cancelled() || error instanceof Cancelled) return;
    setOutputsResult("error", "Cannot hash these outputs:", error instanceof OutputsUnhashable ? `${error.message}.` : error.message);
  } finally {
    if (!cancelled()) progressBlock.hidden = true;
  }
}

function setUp() {
  if (!window.isSecureContext || !globalThis.crypto || !crypto.subtle) {
    const notice = $("unsupported");
    notice.textContent = "This browser offers its signature checks only on secure pages (https:// or localhost). Open this page over https.";
    notice.hidden = false;
  }
  for (const sealInput of [$("seal-file"), $("seal-photo")]) {
    sealInput.addEventListener("change", () => {
      const [file] = sealInput.files;
      if (file) checkSeal(file);
      sealInput.value = ""; // so that choosing the same file again checks it again
    });
  }
  const zone = $("drop-zone");
  // A file dropped anywhere else must not make the browser open (and so render) the uploaded SVG;
  // the outputs pickers still take a file dropped on them.
  for (const type of ["dragover", "drop"]) {
    window.addEventListener(type, (event) => {
      if (!(event.target instanceof HTMLInputElement && event.target.type === "file")) event.preventDefault();
    });
  }
  zone.addEventListener("dragenter", () => zone.classList.add("drag-over"));
  zone.addEventListener("dragleave", (event) => {
    if (!zone.contains(event.relatedTarget)) zone.classList.remove("drag-over");
  });
  zone.addEventListener("dragover", (event) => event.preventDefault());
  zone.addEventListener("drop", (event) => {
    event.preventDefault(); // handled here, not also by the input inside the zone
    zone.classList.remove("drag-over");
    const [file] = event.dataTransfer ? event.dataTransfer.files : [];
    if (file) checkSeal(file);
  });
  const folderInput = $("outputs-folder");
  folderInput.addEventListener("change", () => {
    if (folderInput.files) checkOutputs([...folderInput.files], "folder");
    folderInput.value = "";
  });
  const fileInput = $("outputs-file");
  fileInput.addEventListener("change", () => {
    const files = [...(fileInput.files || [])];
    if (files.length === 1) checkOutputs(files, "file");
    fileInput.value = "";
  });
  window.addEventListener("hashchange", checkAddressBar);
  checkAddressBar();
  document.documentElement.dataset.ready = "true";
}

setUp();

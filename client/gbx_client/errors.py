"""gbx's outcomes: every error carries its exit code (sysexits) and the name its last stderr line shows."""

from __future__ import annotations

import os

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(value: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> str:
    """A name or message made safe for one stderr line: newlines, CRs and every other control or line-separator
    character escaped (\\n, \\r, \\xNN, \\uNNNN), undecodable bytes of a file name shown as \\xNN."""
    text = os.fsdecode(value) if isinstance(value, bytes | os.PathLike) else value
    if text.isprintable():
        return text
    out: list[str] = []
    for char in text:
        code = ord(char)
        if char.isprintable():
            out.append(char)
        elif char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif 0xDC80 <= code <= 0xDCFF:  # a byte os.fsdecode could not decode (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        else:
            out.append(f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


class GbxError(Exception):
    """A failure gbx reports in one line and exits with; subclasses name the exit code."""

    exit_code = 70
    name = "software"


class UsageError(GbxError):
    """64 EX_USAGE: the command line (or an environment fallback) is wrong."""

    exit_code = 64
    name = "usage"


class DataError(GbxError):
    """65 EX_DATAERR: a path cannot be hashed canonically (a symlink, a special file, a name with a newline…)."""

    exit_code = 65
    name = "data"


class NoInput(GbxError):
    """66 EX_NOINPUT: an input, output, manifest or preseal path does not exist or cannot be read."""

    exit_code = 66
    name = "no-input"


class NotEntitled(GbxError):
    """67 EX_NOUSER: the service answered 402, the principal has no runs left; CMD never ran."""

    exit_code = 67
    name = "not-entitled"


class Unreachable(GbxError):
    """69 EX_UNAVAILABLE: the service stayed unreachable (connection errors, timeouts, 502/503/504) for the retry bound."""

    exit_code = 69
    name = "unavailable"


class CantCreate(GbxError):
    """73 EX_CANTCREAT: the seal directory cannot be created or written."""

    exit_code = 73
    name = "cant-create"


class IOFailure(GbxError):
    """74 EX_IOERR: reading a file failed half-way."""

    exit_code = 74
    name = "io-error"


class SealPending(GbxError):
    """75 EX_TEMPFAIL: CMD succeeded but run_complete stayed unreachable; preseal.json is written, `gbx complete` finishes it."""

    exit_code = 75
    name = "seal-pending"


class ProtocolViolation(GbxError):
    """76 EX_PROTOCOL: the service answered something the contract does not allow (a 500, a seal that does not verify)."""

    exit_code = 76
    name = "protocol"


class Refused(GbxError):
    """77 EX_NOPERM: the service refused (401, 403, 409, 422): wrong identity, or the run_id holds another run."""

    exit_code = 77
    name = "refused"


class ConfigError(GbxError):
    """78 EX_CONFIG: no identity could be obtained (no Google credentials, a failing --token-command)."""

    exit_code = 78
    name = "config"


class CommandFailed(GbxError):
    """CMD itself failed: gbx exits with CMD's own status (128+N for signal N), writes no seal, leaves the run started."""

    name = "cmd-failed"

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.exit_code = status


class Interrupted(GbxError):
    """gbx was stopped by signal N (exit 128+N) where no pending seal could be kept: the run stays as it was."""

    name = "interrupted"

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.exit_code = status


# gbx run's own exit codes, in the order `gbx run --help` lists them.
RUN_EXIT_CODES: tuple[tuple[int, str], ...] = (
    (0, "sealed: the seal directory is written and verified offline"),
    (UsageError.exit_code, "usage: a wrong option, a missing value, a malformed run_id, image or project, overlapping --inputs/--outputs/--seal-dir"),
    (DataError.exit_code, "data: inputs or outputs cannot be hashed (symlink, special file, newline/CR/backslash in a name)"),
    (NoInput.exit_code, "no input: --inputs, --manifest or --outputs (after CMD) is missing or unreadable"),
    (NotEntitled.exit_code, "not entitled: 402, no runs left; CMD never ran"),
    (Unreachable.exit_code, "service unreachable before CMD ran (after --retry-timeout); CMD never ran"),
    (CantCreate.exit_code, "cannot write the seal directory, or it holds another run_id's pending seal (checked before any charge)"),
    (IOFailure.exit_code, "I/O error while hashing"),
    (SealPending.exit_code, "seal pending: CMD succeeded, then run_complete stayed unreachable or gbx got SIGTERM/SIGINT; SEAL_DIR/preseal.json holds it, run `gbx complete --url URL SEAL_DIR`"),
    (ProtocolViolation.exit_code, "protocol: the service answered outside the contract (500, bad body, a seal that does not verify)"),
    (Refused.exit_code, "refused by the service (401/403/409/422): a bad identity, or the run_id holds a run with other inputs, image or outputs"),
    (ConfigError.exit_code, "config: no identity (no Google credentials, --token-command failed)"),
)

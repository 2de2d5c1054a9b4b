"""The `gbx` command line: run, complete, verify, hash. Progress and diagnostics on stderr, results on stdout."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from gbx_client.errors import RUN_EXIT_CODES, GbxError, UsageError, printable

# Each command imports what it needs when it runs: `gbx hash` never loads requests or
# cryptography, and every gbx process starts faster (start-up is most of gbx's own overhead).
if TYPE_CHECKING:
    from gbx_client import verify
    from gbx_client.service import Service

RUN_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
PINNED_IMAGE = re.compile(r"[^\s@]+@sha256:[0-9a-f]{64}")
PROJECT_ID = re.compile(r"[a-z][a-z0-9-]{4,28}[a-z0-9]")
METADATA_PROJECT = "/computeMetadata/v1/project/project-id"

# gbx verify keeps the contract's codes: 0 verified, 1 invalid, 2 usage.
VERIFY_INVALID = 1
VERIFY_USAGE = 2
# 128 + SIGPIPE, as a shell tool killed by a closed pipe ends.
EXIT_BROKEN_PIPE = 141

RUN_EPILOG = "exit codes (sysexits; a CMD exiting with one of these is told apart only by gbx's last stderr line, 'gbx: exit N (NAME): ...'):\n" + "\n".join(
    f"  {code:>3}  {meaning}" for code, meaning in RUN_EXIT_CODES
) + "\n  other  CMD's own exit status (128+N when signal N ended it); no seal written, the run stays started"


class Parser(argparse.ArgumentParser):
    """argparse with the exit code of a usage error chosen per command (64 EX_USAGE; 2 for verify, as the contract says)."""

    def __init__(self, *args: Any, usage_exit: int = UsageError.exit_code, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.usage_exit = usage_exit
        self.commands: Mapping[str, argparse.ArgumentParser] = {}  # gbx's own parser: each command's parser by name

    def error(self, message: str) -> NoReturn:
        """Print the usage and the problem, then exit with this command's usage code."""
        self.print_usage(sys.stderr)
        self.exit(self.usage_exit, f"gbx: exit {self.usage_exit} (usage): {printable(message)}\n")


def _env(name: str, default: str | None = None) -> str | None:
    """An option's fallback from the environment (empty counts as unset)."""
    return os.environ.get(name) or default


def _workers(text: str) -> int:
    """A positive number of hashing threads."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value


def _seconds(text: str) -> float:
    """A positive number of seconds."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def _add_service_options(parser: argparse.ArgumentParser, *, retry_default: str = "120") -> None:
    """Identity and retry options, shared by run, complete and verify (verify, run by a person, gives up sooner)."""
    parser.add_argument(
        "--audience", metavar="AUDIENCE", default=_env("GBX_AUDIENCE"),
        help="audience of the ID token fetched with Google credentials (env GBX_AUDIENCE; default: the base URL)",
    )
    parser.add_argument(
        "--token-command", metavar="CMD", default=_env("GBX_TOKEN_COMMAND"),
        help="shell command printing an ID token on stdout, run again when the token is 50 minutes old "
        "(env GBX_TOKEN_COMMAND). Without it: the token in env GBX_ID_TOKEN, else google-auth's fetch_id_token "
        "(metadata server on Cloud Run/GCE/GKE, or GOOGLE_APPLICATION_CREDENTIALS)",
    )
    parser.add_argument(
        "--retry-timeout", metavar="SECONDS", type=_seconds, default=_env("GBX_RETRY_TIMEOUT", retry_default),
        help="seconds each call retries connection errors, timeouts, 429 and 502/503/504 (Retry-After honoured, "
        f"exponential backoff with jitter) before giving up; other 4xx are never retried (env GBX_RETRY_TIMEOUT; default {retry_default})",
    )
    parser.add_argument(
        "--attempt-timeout", metavar="SECONDS", type=_seconds, default=_env("GBX_ATTEMPT_TIMEOUT", "65"),
        help="connect and read timeout of one HTTP attempt, in seconds (env GBX_ATTEMPT_TIMEOUT; default 65)",
    )


def build_parser() -> Parser:
    """The whole command line."""
    parser = Parser(prog="gbx", description="GBX Entitlements runner client: run a licensed job and seal it; verify seals.")
    parser.add_argument("--version", action=_VersionAction, help="print gbx's version and exit")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    parser.commands = commands.choices

    run_parser = commands.add_parser(
        "run", help="check, consume, run CMD and seal it",
        usage="gbx run [options] -- CMD [ARG...]",
        description="check -> consume -> hash inputs -> run_start -> CMD -> hash outputs -> run_complete -> seal directory "
        "-> offline self-check. Run again with the same run_id after a crash: nothing is charged twice; a started run "
        "runs CMD again, a completed one only rewrites its seal directory.",
        epilog=RUN_EPILOG,
    )
    cloud_run_id = (
        f"{os.environ['CLOUD_RUN_EXECUTION']}-{os.environ.get('CLOUD_RUN_TASK_INDEX', '0')}" if os.environ.get("CLOUD_RUN_EXECUTION") else None
    )
    run_parser.add_argument("--url", metavar="URL", default=_env("GBX_URL"), help="base URL serving the /api/... paths (env GBX_URL)")
    run_parser.add_argument(
        "--run-id", metavar="ID", default=_env("GBX_RUN_ID", cloud_run_id),
        help="run id, 1-128 of [A-Za-z0-9._:-] (env GBX_RUN_ID; on Cloud Run jobs default "
        "$CLOUD_RUN_EXECUTION-$CLOUD_RUN_TASK_INDEX, the same across task retries)",
    )
    run_parser.add_argument("--image", metavar="IMAGE", default=_env("GBX_CONTAINER_IMAGE"), help="the job's image, NAME[:TAG]@sha256:<64 hex> (env GBX_CONTAINER_IMAGE)")
    run_parser.add_argument(
        "--project", metavar="PROJECT", default=_env("GOOGLE_CLOUD_PROJECT"),
        help="Google Cloud project the job runs in (env GOOGLE_CLOUD_PROJECT; else asked of the metadata server)",
    )
    run_parser.add_argument("--inputs", metavar="PATH", default=_env("GBX_INPUTS"), help="input file or directory, hashed canonically (env GBX_INPUTS)")
    run_parser.add_argument("--outputs", metavar="DIR", default=_env("GBX_OUTPUTS"), help="output directory (or file) CMD writes, hashed after it (env GBX_OUTPUTS)")
    run_parser.add_argument("--manifest", metavar="FILE", default=_env("GBX_MANIFEST"), help="optional run manifest file; its hash is run_manifest_sha256 (env GBX_MANIFEST)")
    run_parser.add_argument("--seal-dir", metavar="DIR", default=_env("GBX_SEAL_DIR", "seal"), help="where the seal is written (env GBX_SEAL_DIR; default ./seal)")
    run_parser.add_argument(
        "--hash-workers", metavar="N", type=_workers, default=_env("GBX_HASH_WORKERS"),
        help="threads hashing files (env GBX_HASH_WORKERS; default: one per core, at least 2)",
    )
    _add_service_options(run_parser)

    complete_parser = commands.add_parser(
        "complete", help="finish a pending seal (preseal.json) once the service is reachable",
        description="Calls run_complete for the run that SEAL_DIR/preseal.json describes and writes the seal. Exit codes as for gbx run.",
        epilog=RUN_EPILOG,
    )
    complete_parser.add_argument("seal_dir", metavar="SEAL_DIR", help="the seal directory holding preseal.json")
    complete_parser.add_argument(
        "--url", metavar="URL", default=_env("GBX_URL"),
        help="base URL of the service (env GBX_URL); required, and it must be the one preseal.json names: "
        "the runner's token never goes where a preseal alone says",
    )
    _add_service_options(complete_parser)

    verify_parser = commands.add_parser(
        "verify", help="verify a seal offline (and optionally online)", usage_exit=VERIFY_USAGE,
        description="Offline by default: parses seal.svg safely, checks the key it names and the signature, and with "
        "--outputs whether those files are the sealed outputs. Prints the claims and each check.",
        epilog="exit codes: 0 verified (every check asked for), 1 INVALID, 2 usage (bad options, unreadable SEAL or key file), "
        "69 could not check (the keys URL or --online service unreachable), 77/78 the online service refused our identity / none",
    )
    verify_parser.add_argument(
        "seal", metavar="SEAL",
        help="a seal.svg, a seal directory (seal.svg, seal.json, seal.sig, public_key.pem, verify_link.txt), "
        "a verification link BASE/v#P.S (the badge's QR code, run_complete's verify_link), "
        "or a picture of the badge (PNG, JPEG, WebP: a photo, a scan, a screenshot), whose one QR code is read with zxing-cpp "
        "(the pictures extra: pip install 'gbx-client[pictures]'); no QR code, several, or one that is not a link: exit 1",
    )
    keys = verify_parser.add_mutually_exclusive_group()
    keys.add_argument("--public-key", metavar="PEM", help="trust this public key (SPKI PEM file) whatever key version the seal names")
    keys.add_argument(
        "--keys", metavar="FILE_OR_URL", default=_env("GBX_KEYS"),
        help="the service's GET /api/seal/public_keys document, saved or by URL: the seal's key version must be listed "
        "(env GBX_KEYS). One of --keys, --public-key or --online is required (with --online alone, the service's published keys "
        "are used); a seal directory's own public_key.pem is never used by default",
    )
    verify_parser.add_argument("--outputs", metavar="DIR", help="check that DIR (or a file) holds exactly the sealed outputs")
    verify_parser.add_argument("--online", metavar="URL", help="also ask the service at this base URL (POST /api/seal/verify)")
    verify_parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    verify_parser.add_argument(
        "--log-key", metavar="VKEY", default=_env("GBX_LOG_KEY"),
        help="the seal log's verifier key (public_keys' log.vkey) to check seal.tlog-proof with, instead of the --keys "
        "document's (env GBX_LOG_KEY)",
    )
    verify_parser.add_argument(
        "--require-log", action="store_true",
        help="INVALID unless the seal comes with a seal.tlog-proof that verifies (checked offline whenever present and a log key is known)",
    )
    _add_service_options(verify_parser, retry_default="30")

    log_parser = commands.add_parser(
        "log", help="the seal log: gbx log check monitors it", usage_exit=VERIFY_USAGE,
        description="The seal log: every seal the deployment signs, in a public append-only Merkle tree (C2SP tlog-tiles).",
    )
    log_commands = log_parser.add_subparsers(dest="log_command", required=True)
    check_parser = log_commands.add_parser(
        "check", usage_exit=VERIFY_USAGE, help="verify the log's latest checkpoint and its consistency with the one kept in --state",
        description="A monitor: fetches BASE/log/checkpoint, verifies its signature with the log's key, proves from the log's "
        "tiles that it extends the checkpoint kept in --state, then keeps the new one there. A missing --state is first use.",
        epilog="exit codes: 0 consistent (or first use), 1 inconsistent or badly signed (a rewritten history, a split view, "
        "a damaged --state), 2 usage, 69 the log unreachable",
    )
    check_parser.add_argument("--url", metavar="BASE", default=_env("GBX_URL"), help="the deployment's base URL (env GBX_URL)")
    check_parser.add_argument("--state", metavar="FILE", required=True, help="the last checkpoint this monitor verified (the signed note as served)")
    check_parser.add_argument(
        "--log-key", metavar="VKEY", default=_env("GBX_LOG_KEY"),
        help="the log's verifier key (env GBX_LOG_KEY); default: the one BASE/api/seal/public_keys publishes",
    )
    check_parser.add_argument("--retry-timeout", metavar="SECONDS", type=_seconds, default=_seconds("30"), help="give up on an unreachable log after SECONDS (default 30)")

    hash_parser = commands.add_parser(
        "hash", help="print the canonical SHA-256 of files or directories",
        description="A file: SHA-256 of its bytes. A directory: what "
        "`(cd DIR && find . -type f -print0 | LC_ALL=C sort -z | xargs -0r sha256sum) | sha256sum` prints. "
        "Symlinks, special files and names with a newline, carriage return or backslash are an error (exit 65).",
    )
    hash_parser.add_argument("paths", metavar="PATH", nargs="+", help="file or directory")
    hash_parser.add_argument(
        "--workers", metavar="N", type=_workers, default=_env("GBX_HASH_WORKERS"),
        help="threads hashing files (env GBX_HASH_WORKERS; default: one per core, at least 2)",
    )
    hash_parser.add_argument("--json", action="store_true", help="one JSON object per PATH (sha256, files, bytes, seconds)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gbx` console script; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if args_list[:1] == ["run"] and "--" in args_list:
        split = args_list.index("--")
        args_list, command = args_list[:split], args_list[split + 1 :]
    parser = build_parser()
    args, unknown = parser.parse_known_args(args_list)
    if unknown:
        # Reported by the command's own parser, so that it exits with that command's usage code (2 for verify).
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    usage_exit = VERIFY_USAGE if args.command in ("verify", "log") else UsageError.exit_code
    try:
        if args.command == "run":
            return _run(args, command)
        if args.command == "complete":
            return _complete(args)
        if args.command == "verify":
            return _verify(args)
        if args.command == "log":
            return _log_check(args)
        return _hash(args)
    except GbxError as exc:
        code = usage_exit if isinstance(exc, UsageError) else exc.exit_code
        _say(f"exit {code} ({exc.name}): {exc}")
        return code
    except KeyboardInterrupt:
        _say("exit 130 (interrupted)")
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (`gbx verify … | head`): not a bug. Point stdout at /dev/null so that
        # the interpreter's own flush at exit does not fail again, and end as a killed-by-SIGPIPE tool would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        _say(f"exit {EXIT_BROKEN_PIPE} (broken-pipe): the reader of stdout went away")
        return EXIT_BROKEN_PIPE
    except Exception as exc:  # a bug: its traceback, then the same last line as every other outcome
        traceback.print_exc()
        _say(f"exit {GbxError.exit_code} ({GbxError.name}): unexpected {type(exc).__name__}: {exc}")
        return GbxError.exit_code


def _run(args: argparse.Namespace, command: list[str]) -> int:
    """gbx run."""
    from gbx_client import run

    if not command:
        raise UsageError("no CMD: gbx run [options] -- CMD [ARG...]")
    missing = [option for option, value in (("--url", args.url), ("--run-id", args.run_id), ("--image", args.image), ("--inputs", args.inputs), ("--outputs", args.outputs)) if not value]
    if missing:
        raise UsageError(f"missing {', '.join(missing)} (or their environment variables; see gbx run --help)")
    if not RUN_ID.fullmatch(args.run_id):
        raise UsageError(f"--run-id {args.run_id!r}: 1-128 characters of A-Z a-z 0-9 . _ : -")
    if not PINNED_IMAGE.fullmatch(args.image):
        raise UsageError(f"--image {args.image!r}: must be pinned by digest, NAME[:TAG]@sha256:<64 lower-case hex>")
    seal_dir = Path(args.seal_dir).resolve()
    for option, tree in (("--inputs", args.inputs), ("--outputs", args.outputs)):
        if seal_dir.is_relative_to(Path(tree).resolve()):
            # The seal files (and a preseal) would change the very hashes they seal, and a resumed run's hashes with them.
            raise UsageError(f"--seal-dir {args.seal_dir} is inside {option} {tree}; put it elsewhere")
    inputs, outputs = Path(args.inputs).resolve(), Path(args.outputs).resolve()
    if outputs.is_relative_to(inputs) or inputs.is_relative_to(outputs):
        # CMD's outputs would change the inputs hash (or the other way round): a retried run would no longer match its run_start.
        raise UsageError(f"--outputs {args.outputs} and --inputs {args.inputs} overlap (one is inside the other); keep them apart")
    service = _service(args, args.url)
    project = args.project or _metadata_project()
    if not PROJECT_ID.fullmatch(project):
        raise UsageError(f"--project {project!r} is not a Google Cloud project ID")
    job = run.Job(
        run_id=args.run_id, image=args.image, project=project, inputs=Path(args.inputs), outputs=Path(args.outputs),
        manifest=Path(args.manifest) if args.manifest else None, seal_dir=Path(args.seal_dir), command=command, workers=args.hash_workers,
    )
    seal_id = run.run_job(job, service, _say)
    _say(f"exit 0 (sealed): run {job.run_id} sealed as {seal_id} in {job.seal_dir}")
    return 0


def _complete(args: argparse.Namespace) -> int:
    """gbx complete."""
    from gbx_client import run

    if not args.url:
        raise UsageError("missing --url (or GBX_URL): the base URL the run was started at")
    seal_dir = Path(args.seal_dir)
    seal_id = run.complete_pending(seal_dir, lambda url: _service(args, _same_url(args.url, url)), _say)
    _say(f"exit 0 (sealed): seal {seal_id} in {seal_dir}")
    return 0


def _same_url(given: str, preseal_url: str) -> str:
    """The base URL gbx complete may send the token to: --url, and only when preseal.json names the same one."""
    if given.rstrip("/") != preseal_url.rstrip("/"):
        # A preseal.json is a file anyone with write access to the seal directory could edit.
        raise UsageError(f"preseal.json names {preseal_url}, not --url {given}: refusing to send the runner's token there")
    return given


def _verify(args: argparse.Namespace) -> int:
    """gbx verify: print the claims and each check; 0 only when everything asked for verifies."""
    from gbx_client import verify

    seal = _seal_argument(args.seal)
    if seal.link is not None and not seal.svg:
        # A QR code can point anywhere: say which site the link names; the keys decide what verifies.
        what = "the picture's QR code" if isinstance(seal.source, Path) else "the link"
        _say(f"{what} points at {_link_site(seal.link)}; checking it against the keys from the options")
    service = _service(args, args.online) if args.online else None
    keys = _keys(args, seal, service)
    outputs = Path(args.outputs) if args.outputs else None
    if outputs is not None and not outputs.exists():
        raise UsageError(f"--outputs {outputs}: no such file or directory")
    online = (lambda given: _online_check(service, given)) if service is not None else None
    if args.log_key:
        keys = dataclasses.replace(keys, log_vkey=args.log_key)
    if seal.tlog_proof is not None and keys.log_vkey is None:
        _say("seal.tlog-proof not checked: no log key (give --keys or --online, whose public keys name it, or --log-key)")
    result = verify.verify_seal(seal, keys, outputs=outputs, online=online, require_log=args.require_log)
    if args.json:
        logged = {"logged": {"entry": result.logged[0] + 1, "of": result.logged[1]}} if result.logged else {}
        print(json.dumps({**result.as_json(), "keys": keys.source, **logged}, indent=2, sort_keys=True))
    else:
        _print_verification(result, keys.source)
        if result.logged is not None:
            from gbx_client.logproof import logged_text

            print(logged_text(*result.logged))
    if result.verified:
        _say(f"exit 0 (verified): seal {result.seal_id}")
        return 0
    _say(f"exit {VERIFY_INVALID} (invalid): {result.first_failure()}")
    return VERIFY_INVALID


def _seal_argument(text: str) -> verify.SealFiles:
    """gbx verify's SEAL: a verification link, a picture of the badge (its QR code's link), a seal.svg or a seal directory."""
    from gbx_client import pictures, verify  # pictures imports zxing-cpp and Pillow only when it reads one

    if verify.is_link(text):
        return verify.link_seal(text)
    path = Path(text)
    if pictures.is_picture(path):
        return pictures.picture_seal(path)
    return verify.load_seal(path)


def _log_check(args: argparse.Namespace) -> int:
    """gbx log check: 0 consistent (or first use), 1 inconsistent or badly signed."""
    from gbx_client import logproof
    from gbx_client.service import RetryPolicy, Service

    if not args.url:
        raise UsageError("missing --url (or GBX_URL): the deployment's base URL")
    service = Service(args.url, identity=None, policy=RetryPolicy(timeout=args.retry_timeout), report=_say)
    vkey = args.log_key or logproof.log_vkey(service)
    try:
        result = logproof.check_log(service, Path(args.state), vkey)
    except logproof.LogInconsistent as exc:
        print(f"INCONSISTENT  {service.base_url}/log: {exc}")
        _say(f"exit 1 (inconsistent): {exc}")
        return 1
    if result.old_size is None:
        print(f"OK  first use: kept the checkpoint of {result.new_size} entries in {args.state}")
    else:
        print(f"OK  consistent: {result.old_size} -> {result.new_size} entries; kept in {args.state}")
    _say("exit 0 (consistent)")
    return 0


def _keys(args: argparse.Namespace, seal: verify.SealFiles, service: Service | None) -> verify.KeyRing:
    """The keys to check the seal against: --public-key, --keys, --online's, else the seal directory's own."""
    from gbx_client import verify

    if args.public_key:
        try:
            return verify.single_key(Path(args.public_key).read_bytes(), args.public_key)
        except OSError as exc:
            raise UsageError(f"cannot read --public-key {args.public_key}: {exc.strerror or exc}") from exc
    if args.keys and args.keys.startswith(("http://", "https://")):
        return _fetch_keys(_service(args, args.keys, identity_needed=False), args.keys)
    if args.keys:
        return verify.keys_file(Path(args.keys))
    if service is not None:
        url = f"{service.base_url}/api/seal/public_keys"
        return _fetch_keys(service, url)
    # Never the seal directory's own public_key.pem by default: whoever made the directory chose that key,
    # so a forgery would verify against it. Naming it with --public-key is a choice the caller makes knowingly.
    raise UsageError("no key to check against: give --keys FILE_OR_URL (the service's /api/seal/public_keys), --public-key PEM or --online URL")


def _fetch_keys(service: Service, url: str) -> verify.KeyRing:
    """GET a public keys document (no identity needed)."""
    from gbx_client import verify

    reply = service.send("GET", url, step="public_keys", auth=False)
    if reply.status != 200:
        raise UsageError(f"--keys {url}: HTTP {reply.status} {reply.message}")
    return verify.keys_document(reply.body, url)


def _link_site(link: str) -> str:
    """The site a verification link names, or the text itself when it is not one."""
    from gbx_client.seal_format import SealDocumentInvalid, parse_verify_link

    try:
        return parse_verify_link(link).site
    except SealDocumentInvalid:
        return "no site (not a verification link)"


def _online_check(service: Service | None, seal: verify.SealFiles) -> str:
    """Ask the service to verify the seal (its svg, or the link it was given as): "ok", or the first check it failed."""
    from gbx_client import run, verify

    assert service is not None
    if seal.svg:
        reply = service.post_svg("/api/seal/verify", seal.svg, step="verify")
    else:
        assert seal.link is not None
        reply = service.send("POST", service.base_url + "/api/seal/verify", step="verify", data=(seal.link + "\r\n").encode("utf-8"), content_type="text/uri-list")
    if reply.status == 200:
        body = reply.json_object("verify")
        if body.get("status") == "VERIFIED":
            return verify.OK
        checks = body.get("checks")
        failed = next((f"{name}: {value}" for name, value in checks.items() if value != verify.OK), "INVALID") if isinstance(checks, dict) else "INVALID"
        return f"the service says INVALID ({failed})"
    if reply.status in (400, 413):
        return f"the service refuses the document ({reply.message})"
    raise run.refusal("verify", reply, "-")


def _print_verification(result: verify.Verification, key_source: str) -> None:
    """The human-readable result on stdout: status, each check, the claims."""
    print(f"{'VERIFIED' if result.verified else 'INVALID'}  seal {result.seal_id or '-'}")
    print(f"  keys from {key_source}")
    width = max(len(name) for name in result.checks)
    for name, value in result.checks.items():
        print(f"  {name:<{width}}  {value}")
    if result.claims:
        print("claims:")
        claim_width = max(len(name) for name in result.claims)
        for name in sorted(result.claims):
            print(f"  {name:<{claim_width}}  {result.claims[name]}")


def _hash(args: argparse.Namespace) -> int:
    """gbx hash: the canonical hash of each PATH on stdout."""
    from gbx_client import hashing

    for path_text in args.paths:
        digest = hashing.canonical_hash(Path(path_text), workers=args.workers)
        if args.json:
            print(json.dumps({"path": path_text, "sha256": digest.sha256, "files": digest.files, "bytes": digest.bytes, "seconds": round(digest.seconds, 6)}))
        elif len(args.paths) == 1:
            print(digest.sha256)
        else:
            print(f"{digest.sha256}  {path_text}")
        _say(f"hash {path_text}: {digest.describe()}")
    return 0


def _service(args: argparse.Namespace, url: str, *, identity_needed: bool = True) -> Service:
    """A Service for url with the identity and retry options given."""
    from gbx_client import identity
    from gbx_client.service import RetryPolicy, Service

    tokens = identity.token_source(
        token_command=args.token_command, env_token=os.environ.get("GBX_ID_TOKEN"), audience=args.audience or url.rstrip("/")
    ) if identity_needed else None
    policy = RetryPolicy(timeout=args.retry_timeout, attempt_timeout=args.attempt_timeout)
    return Service(url, identity=tokens, policy=policy, report=_say)


def _metadata_project() -> str:
    """The project ID from the metadata server (Cloud Run, GCE, GKE), when --project and GOOGLE_CLOUD_PROJECT are unset."""
    host = os.environ.get("GCE_METADATA_HOST", "metadata.google.internal")
    import requests  # the metadata server is a plain GET; a short bound, it is either there or not

    try:
        response = requests.get(f"http://{host}{METADATA_PROJECT}", headers={"Metadata-Flavor": "Google"}, timeout=3)
    except requests.RequestException as exc:
        raise UsageError("no --project: set --project or GOOGLE_CLOUD_PROJECT (no metadata server answered)") from exc
    if response.status_code != 200 or not response.text.strip():
        raise UsageError(f"no --project: set --project or GOOGLE_CLOUD_PROJECT (metadata server: HTTP {response.status_code})")
    return response.text.strip()


def _say(text: str) -> None:
    """One line of progress or diagnosis on stderr: names (and whatever a service said) cannot break it into two."""
    print(f"gbx: {printable(text)}", file=sys.stderr, flush=True)


class _VersionAction(argparse.Action):
    """--version, looked up only when asked for (reading package metadata costs start-up time)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, default: Any = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: str | None = None) -> None:
        print(f"gbx {_version()}")
        parser.exit()


def _version() -> str:
    """The installed package's version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gbx-client")
    except PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())

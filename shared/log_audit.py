"""The seal log's part of the ledger audit: every seal record in the log exactly once, and the tiles hashing to the latest checkpoint.

Run by the ledger audit when a pass completes (hourly). It reads the latest checkpoint (and verifies its signature), every
entry bundle and hash tile the tree needs, every sequenced seal's index and every seal record's id, in pages.
"""

from __future__ import annotations

from gbx_client import tlog
from shared import log_store, sealog
from shared.models import LogAudit

PAGE = 1000
# The `event` of the audit's ERROR line per problem found in the log (a log-based metric can count them).
LOG_MISMATCH_EVENT = "seal_log_mismatch"
MAX_LISTED = 100


def _all_entries(size: int) -> list[bytes]:
    """The log's entries in index order, from its entry bundles."""
    entries: list[bytes] = []
    for n in range((size + tlog.TILE_WIDTH - 1) // tlog.TILE_WIDTH):
        width = tlog.tile_width(0, n, size)
        data = log_store.read_tile(tlog.ENTRIES, n) or b""
        entries += tlog.parse_entry_bundle(data)[:width]
    return entries


def check_log() -> LogAudit:
    """Check the log against its checkpoint and the seal records; every problem is also logged as an ERROR line."""
    from shared.http import log

    problems: list[str] = []
    state = log_store.read_state()
    size = state.size
    if state.checkpoint:
        try:
            checkpoint = tlog.open_checkpoint(state.checkpoint, sealog.verifier())
            if checkpoint.size != size:
                problems.append(f"the latest checkpoint says {checkpoint.size} entries, the log's state {size}")
            tiles_root = tlog.TileHashes(sealog._tile_reader(), size).root() if size else tlog.EMPTY_ROOT
            if tiles_root != checkpoint.root:
                problems.append("the tiles do not hash to the latest checkpoint's root")
        except (tlog.LogFormatError, tlog.LogVerificationError) as exc:
            problems.append(f"the latest checkpoint or its tiles do not verify: {exc}")
    entries = _all_entries(size)
    if len(entries) != size:
        problems.append(f"the entry bundles hold {len(entries)} entries, the checkpoint {size}")
    seen: dict[bytes, int] = {}
    for index, entry in enumerate(entries):
        if entry in seen:
            problems.append(f"entries {seen[entry]} and {index} are the same seal.json")
        seen.setdefault(entry, index)
    indexed: dict[str, int] = {}
    after: str | None = None
    while page := log_store.read_entries_page(after, PAGE):
        indexed.update(page)
        after = page[-1][0]
    if len(indexed) != size:
        problems.append(f"{len(indexed)} seals are indexed in the log, the checkpoint has {size} entries")
    seals, pending, after = 0, 0, None
    while page_of_seals := log_store.read_seal_payloads_page(after, PAGE):
        after = page_of_seals[-1][0]
        for seal_id, payload in page_of_seals:
            seals += 1
            if seal_id not in indexed:
                if log_store.is_pending(seal_id):
                    pending += 1  # not yet integrated: the next integrator's
                else:
                    problems.append(f"seal {seal_id} is not in the log (recorded before the log existed? python -m shared.backfill queues it)")
                continue
            index = indexed.pop(seal_id)
            if index >= len(entries) or entries[index] != tlog.entry_hash(payload.encode()):
                problems.append(f"seal {seal_id}: entry {index} of the log is not its seal.json's hash")
    for seal_id, index in sorted(indexed.items(), key=lambda item: item[1]):
        problems.append(f"entry {index} names seal {seal_id}, which has no seal record")
    for problem in problems:
        log({"severity": "ERROR", "message": f"seal log: {problem}", "event": LOG_MISMATCH_EVENT})
    return LogAudit(size=size, seals=seals, pending=pending, problems=problems[:MAX_LISTED], problem_count=len(problems))

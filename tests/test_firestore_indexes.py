"""firestore.indexes.json holds exactly the composite indexes the service's queries need, and each query runs."""

from __future__ import annotations

import json

from shared import ledger_store, store
from shared.config import REPO_ROOT
from tests.conftest import RUNNER, Api

OTHER = "other@acme-prod.iam.gserviceaccount.com"

# Each composite query of the service, by the index it needs: (collection, ((field, order), ...)) -> "module:function"
# (module shared.store when not named). Collection-group indexes are marked with a leading "*" on the collection.
QUERIES = {
    ("ledger", (("principal", "ASCENDING"), ("at", "DESCENDING"))): "ledger_store:ledger_for_principal",
    ("ledger", (("grant", "ASCENDING"), ("at", "ASCENDING"))): "ledger_store:ledger_for_grant",
    ("grants", (("open", "ASCENDING"), ("spend_key", "ASCENDING"), ("created_at", "ASCENDING"), ("group", "ASCENDING"))): "read_first_to_spend",
    ("grants", (("open", "ASCENDING"), ("issued_by", "ASCENDING"), ("spend_key", "ASCENDING"), ("slot", "ASCENDING"))): "read_open_shard_at",
    ("grants", (("open", "ASCENDING"), ("issued_by", "ASCENDING"), ("spend_key", "ASCENDING"), ("slot", "DESCENDING"))): "read_open_shard_at",
    # sum(delta) reads the summed field from the index too.
    ("ledger", (("principal", "ASCENDING"), ("shard", "ASCENDING"), ("delta", "ASCENDING"))): "ledger_store:ledger_sum_for_shard",
    ("ledger", (("principal", "ASCENDING"), ("reason", "ASCENDING"), ("at", "ASCENDING"))): "ledger_store:count_ledger_entries",
    # A partner's balance for a principal (sum(remaining) read from the index), and its open documents near the low line.
    ("grants", (("issued_by", "ASCENDING"), ("spend_key", "ASCENDING"), ("remaining", "ASCENDING"))): "read_partner_balance",
    ("grants", (("issued_by", "ASCENDING"), ("open", "ASCENDING"), ("spend_key", "ASCENDING"))): "crossings:guard_from_balance",
    # The events outbox: the sweeper's commit order.
    ("events", (("published", "ASCENDING"), ("at", "ASCENDING"), ("n", "ASCENDING"))): "events:sweep",
    ("*grants", (("lead", "ASCENDING"), ("created_at", "ASCENDING"))): "partner_store:read_export_page",
    ("*grants", (("lead", "ASCENDING"), ("issued_by", "ASCENDING"), ("created_at", "ASCENDING"))): "partner_store:read_export_page",
    ("ledger", (("grant", "ASCENDING"), ("reason", "ASCENDING"), ("at", "ASCENDING"), ("delta", "ASCENDING"))): "ledger_store:ledger_runs",
}


def _indexes() -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    document = json.loads((REPO_ROOT / "firestore.indexes.json").read_text())
    return {
        (("*" if index["queryScope"] == "COLLECTION_GROUP" else "") + index["collectionGroup"], tuple((field["fieldPath"], field["order"]) for field in index["fields"]))
        for index in document["indexes"]
    }


def test_the_index_file_lists_exactly_the_queries_indexes() -> None:
    assert _indexes() == set(QUERIES)
    import importlib

    for target in QUERIES.values():
        module, _, name = target.rpartition(":")
        assert callable(getattr(importlib.import_module(f"shared.{module or 'store'}"), name))


def test_each_indexed_query_runs_and_orders_as_its_index(api: Api) -> None:
    first = api.issue(RUNNER, 3).json()["grant_id"]
    api.issue(OTHER, 1)
    api.consume("job-1")
    api.consume("job-2")
    newest_first = ledger_store.ledger_for_principal(RUNNER)
    assert [(e["reason"], e["delta"]) for e in newest_first] == [("consume", -1), ("consume", -1), ("issue", 3)]
    assert [e["at"] for e in newest_first] == sorted((e["at"] for e in newest_first), reverse=True)
    assert {e["principal"] for e in newest_first} == {RUNNER}
    assert len(ledger_store.ledger_for_principal(RUNNER, limit=1)) == 1
    oldest_first = ledger_store.ledger_for_grant(first)
    assert [e["delta"] for e in oldest_first] == [3, -1, -1]
    assert {e["grant"] for e in oldest_first} == {first}


def test_the_spending_queries_run_and_order_as_their_indexes(api: Api) -> None:
    import datetime as dt

    later = api.issue(RUNNER, 8).json()["grant_id"]  # two shards, never expiring
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    first = api.issue(RUNNER, 1, expires_at=soon.isoformat().replace("+00:00", "Z")).json()["grant_id"]
    now = dt.datetime.now(dt.UTC)
    head = store.read_first_to_spend(RUNNER, now)
    assert head is not None and head.grant_id == first
    shards = {g["grant_id"]: g["slot"] for g in store.all_grants(RUNNER) if g["group"] == later}
    low, high = min(shards.values()), max(shards.values())
    up = store.read_open_shard_at(RUNNER, store.FAR_FUTURE, low, upwards=True, issued_by="admin")
    down = store.read_open_shard_at(RUNNER, store.FAR_FUTURE, high, upwards=False, issued_by="admin")
    assert up is not None and up.slot == low and down is not None and down.slot == low
    assert store.read_open_shard_at(RUNNER, store.FAR_FUTURE, high + 1e-9, upwards=True, issued_by="admin") is None
    assert store.read_balance(RUNNER, now) == 9

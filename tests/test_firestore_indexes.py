"""firestore.indexes.json holds exactly the composite indexes the service's queries need, and each query runs."""

from __future__ import annotations

import json

from shared import store
from shared.config import REPO_ROOT
from tests.conftest import RUNNER, Api

OTHER = "other@acme-prod.iam.gserviceaccount.com"

# Each composite query of shared/store.py, by the index it needs: (collection, ((field, order), ...)).
QUERIES = {
    ("ledger", (("principal", "ASCENDING"), ("at", "DESCENDING"))): "ledger_for_principal",
    ("ledger", (("grant", "ASCENDING"), ("at", "ASCENDING"))): "ledger_for_grant",
    # sum(delta) reads the summed field from the index too.
    ("ledger", (("principal", "ASCENDING"), ("shard", "ASCENDING"), ("delta", "ASCENDING"))): "ledger_sum_for_shard",
    ("ledger", (("principal", "ASCENDING"), ("reason", "ASCENDING"), ("at", "ASCENDING"))): "count_ledger_entries",
}


def _indexes() -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    document = json.loads((REPO_ROOT / "firestore.indexes.json").read_text())
    return {
        (index["collectionGroup"], tuple((field["fieldPath"], field["order"]) for field in index["fields"]))
        for index in document["indexes"]
    }


def test_the_index_file_lists_exactly_the_queries_indexes() -> None:
    assert _indexes() == set(QUERIES)
    for name in QUERIES.values():
        assert callable(getattr(store, name))


def test_each_indexed_query_runs_and_orders_as_its_index(api: Api) -> None:
    first = api.issue(RUNNER, 3).json()["grant_id"]
    api.issue(OTHER, 1)
    api.consume("job-1")
    api.consume("job-2")
    newest_first = store.ledger_for_principal(RUNNER)
    assert [(e["reason"], e["delta"]) for e in newest_first] == [("consume", -1), ("consume", -1), ("issue", 3)]
    assert [e["at"] for e in newest_first] == sorted((e["at"] for e in newest_first), reverse=True)
    assert {e["principal"] for e in newest_first} == {RUNNER}
    assert len(store.ledger_for_principal(RUNNER, limit=1)) == 1
    oldest_first = store.ledger_for_grant(first)
    assert [e["delta"] for e in oldest_first] == [3, -1, -1]
    assert {e["grant"] for e in oldest_first} == {first}

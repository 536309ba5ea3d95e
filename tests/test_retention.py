"""Retention: the oldest studies go while the store is over its size or age limit; protected and
leased ones never.  Domain tests on an archive opened here, and one against a running node."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from node.config import ConfigError, Retention, build_config
from node.index.leases import now
from node.index.models import Instance, Study
from node.query.keys import Root
from node.retention import LOW_WATERMARK, RetentionEnforcer
from node.services import Services, open_services
from tests import retrievedata as rd
from tests.conftest import NodeProcess, poll_until
from tests.dicomdata import PREFIX, make_instance, send_datasets
from tests.findcorpus import receive_all

STUDIES = [f"{PREFIX}81.{n}" for n in range(1, 7)]  # received in this order, 3 instances each


def study_datasets(study: str, patient: str = "RET-1", rows: int = 32) -> list[Any]:
    return [make_instance(study=study, series=f"{study}.1", sop_instance=f"{study}.1.{n}",
                          PatientID=patient, InstanceNumber=n, rows=rows) for n in (1, 2, 3)]


@pytest.fixture
def archive(index_settings: dict[str, Any], tmp_path: Path) -> Iterator[Services]:
    """The corpus stored in a new archive, its index on each backend."""
    settings: dict[str, Any] = {**index_settings}
    services = open_services(build_config(settings, tmp_path))
    for number, study in enumerate(STUDIES):
        receive_all(services.ingestor,
                    study_datasets(study, "RET-VIP" if number == 0 else "RET-1"))
    try:
        yield services
    finally:
        services.close()


def studies(services: Services) -> list[str]:
    rows = Study.select(Study.study_instance_uid).order_by(Study.received_at).tuples()
    return [str(uid) for (uid,) in rows.execute(services.db)]


def study_bytes(services: Services) -> int:
    return sum(int(s) for (s,) in Instance.select(Instance.size).tuples().execute(services.db))


def enforcer(services: Services, policy: Retention) -> RetentionEnforcer:
    return RetentionEnforcer(services.db, services.deleter, lambda: policy)


def test_over_its_size_the_store_loses_its_oldest_studies(archive: Services) -> None:
    total = study_bytes(archive)
    per_study = total // len(STUDIES)
    limit = total - per_study  # one study over
    result = enforcer(archive, Retention(max_store_size=limit)).run_once()
    left = studies(archive)
    # Down to LOW_WATERMARK of the limit: the two oldest go, the newest stay.
    assert left == STUDIES[2:]
    assert result.store_bytes == study_bytes(archive) <= limit * LOW_WATERMARK
    assert result.report.studies_deleted == 2 and result.over_limit == 0
    files = {p.name for p in archive.store.objects.rglob("*") if p.is_file()}
    assert len(files) == 3 * len(left)


def test_protected_patients_and_studies_are_never_deleted(archive: Services) -> None:
    policy = Retention(max_store_size=1, protected_patients=frozenset({"RET-VIP"}),
                       protected_studies=frozenset({STUDIES[3]}))
    result = enforcer(archive, policy).run_once()
    assert studies(archive) == [STUDIES[0], STUDIES[3]]
    assert result.over_limit > 0  # what is left cannot go: said, not hidden


def test_a_study_being_retrieved_is_kept(archive: Services) -> None:
    with archive.planner.reserve(rd.identifier("STUDY", StudyInstanceUID=STUDIES[1]),
                                 Root.STUDY):
        enforcer(archive, Retention(max_store_size=1)).run_once()
        assert studies(archive) == [STUDIES[1]]
    enforcer(archive, Retention(max_store_size=1)).run_once()
    assert studies(archive) == []


def test_studies_older_than_the_age_limit_go(archive: Services) -> None:
    old = now() - timedelta(days=40)
    Study.update(received_at=old).where(
        Study.study_instance_uid.in_(STUDIES[:4])).execute(archive.db)
    policy = Retention(max_age_days=30, protected_studies=frozenset({STUDIES[2]}))
    result = enforcer(archive, policy).run_once()
    assert studies(archive) == [STUDIES[2], STUDIES[4], STUDIES[5]]
    assert result.report.studies_deleted == 3


def test_no_limit_deletes_nothing(archive: Services) -> None:
    enforcer(archive, Retention()).run_once()
    assert studies(archive) == STUDIES


def test_retention_config_is_checked() -> None:
    config = build_config({"retention": {"max_store_size": "2 GiB", "max_age_days": 365,
                                         "protected_patients": ["A"]}}, Path("."))
    assert config.retention.max_store_size == 2 * 1024**3
    assert config.retention.protected_patients == frozenset({"A"})
    with pytest.raises(ConfigError, match=r"retention\.max_store_size"):
        build_config({"retention": {"max_store_size": "big"}}, Path("."))
    with pytest.raises(ConfigError, match=r"retention\.keep_forever: unknown key"):
        build_config({"retention": {"keep_forever": True}}, Path("."))


def test_a_running_node_keeps_its_store_under_the_limit(node_factory: Any) -> None:
    """Instances sent one study at a time: as soon as the store passes its limit the oldest
    studies go (growth wakes the policy; the interval is an hour), and the newest stay."""
    limit = 120_000  # bytes: about 5 of these studies (3 x 64x64x16-bit images each)
    node: NodeProcess = node_factory(retention={"max_store_size": limit,
                                                "check_interval": 3600}).start()
    sent = [f"{PREFIX}82.{n}" for n in range(1, 11)]
    for study in sent:
        send_datasets(node.port, study_datasets(study, rows=64))

    def total() -> int:
        return int(node.rows("SELECT COALESCE(SUM(size), 0) FROM instance")[0][0])

    assert poll_until(lambda: total() <= limit, 20), total()
    kept = [str(uid) for (uid,) in node.rows(
        "SELECT study_instance_uid FROM study ORDER BY received_at")]
    assert kept and kept == sent[-len(kept):]  # the newest, in order
    assert len(node.stored_files()) == 3 * len(kept)
    assert "retention (store over its size limit): study" in node.log()

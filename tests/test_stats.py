"""``dicom-node stats``: the figures match what was stored, and name no patient.

A real ``serve`` receives the C-FIND corpus (tests/findcorpus.py) through C-STORE; ``stats``,
run beside it, must report the corpus' own counts per level and per modality (derived here from
the corpus definition, never from the node), the bytes of the stored files (from the index and
from the disk, which agree), and a last-received time within the sending.  A file without a row
and a file in the quarantine show up where they belong.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests import findcorpus as fc
from tests.conftest import REPO, NodeProcess

SLACK = timedelta(seconds=2)  # clock granularity between this process and the node


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def expected_modalities() -> list[dict[str, Any]]:
    studies: dict[str, set[str]] = defaultdict(set)
    series: dict[str, int] = defaultdict(int)
    instances: dict[str, int] = defaultdict(int)
    for item in fc.SERIES.values():
        studies[item.modality].add(item.study)
        series[item.modality] += 1
        instances[item.modality] += item.count
    rows = [{"modality": m, "studies": len(studies[m]), "series": series[m],
             "instances": instances[m]} for m in studies]
    return sorted(rows, key=lambda r: (-r["instances"], r["modality"]))


def test_help() -> None:
    done = cli("stats", "--help")
    assert done.returncode == 0
    assert "--json" in done.stdout and "-c PATH, --config PATH" in done.stdout


def test_stats_match_what_was_stored(node_factory: Any) -> None:
    node: NodeProcess = node_factory().start()
    started = datetime.now(UTC).replace(tzinfo=None)
    fc.load(node.port, list(fc.datasets()))
    finished = datetime.now(UTC).replace(tzinfo=None)
    files = node.stored_files()
    total = sum(p.stat().st_size for p in files)

    done = cli("stats", "--json", "-c", str(node.config_path))
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert {k: stats[k] for k in ("patients", "studies", "series", "instances")} == {
        "patients": len(fc.PATIENTS), "studies": len(fc.STUDIES), "series": len(fc.SERIES),
        "instances": sum(s.count for s in fc.SERIES.values()),
    }
    assert stats["indexed_bytes"] == total
    assert (stats["disk_files"], stats["disk_bytes"]) == (len(files), total)
    assert (stats["quarantine_files"], stats["quarantine_bytes"]) == (0, 0)
    assert stats["modalities"] == expected_modalities()
    for key in ("first_received", "last_received"):
        when = datetime.fromisoformat(stats[key].removesuffix("Z"))
        assert started - SLACK <= when <= finished + SLACK, (key, when)
    assert stats["first_received"] <= stats["last_received"]

    # The table: the same figures, and nothing that names a patient.
    done = cli("stats", "-c", str(node.config_path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert f"instances       {stats['instances']}" in lines
    assert any(line.startswith("on disk") and f"({total:,} B) in {len(files)} files" in line
               for line in lines)
    assert any(line.split() == ["CT", "4", "5", "15"] for line in lines), lines
    for patient in fc.PATIENTS.values():
        assert patient.patient_id not in done.stdout
        assert patient.patient_name.split("^")[0] not in done.stdout

    # --top limits the modalities; --no-disk skips the walk.
    done = cli("stats", "--json", "--top", "2", "--no-disk", "-c", str(node.config_path))
    limited = json.loads(done.stdout)
    assert limited["modalities"] == expected_modalities()[:2]
    assert limited["disk_files"] is None and limited["disk_bytes"] is None

    # A file without a row counts on disk only; a quarantined file in the quarantine.
    stray = node.storage / "objects" / "ab" / "cd" / ("abcd" + "0" * 60)
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"x" * 1000)
    (node.storage / "quarantine").mkdir()
    (node.storage / "quarantine" / ("f" * 64)).write_bytes(b"y" * 10)
    stats = json.loads(cli("stats", "--json", "-c", str(node.config_path)).stdout)
    assert stats["indexed_bytes"] == total
    assert (stats["disk_files"], stats["disk_bytes"]) == (len(files) + 1, total + 1000)
    assert (stats["quarantine_files"], stats["quarantine_bytes"]) == (1, 10)


def test_stats_of_an_empty_archive(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text("storage: storage\nport: 0\n")
    done = cli("stats", "--json", "-c", str(config))
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert stats["instances"] == 0 and stats["indexed_bytes"] == 0
    assert stats["modalities"] == [] and stats["last_received"] is None
    done = cli("stats", "-c", str(config))
    assert "last received   -" in done.stdout

"""``dicom-node pull``: fetch studies from a remote PACS that is not our code (DCMTK's dcmqrscp and
Orthanc), by C-MOVE to the node's own AE title and by C-GET.

Both remotes run once for the module on free ports, loaded through C-STORE by DCMTK's storescu,
and know the node (AE title ``PULLNODE`` on one port reserved for the module) as a move
destination. Each test gets a fresh node configuration and store; ``pull`` runs as a subprocess,
exactly as an administrator runs it, and what arrives is compared with what was loaded.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from node.config import load_config
from node.index.writer import Source
from node.ingest import Received
from node.services import open_services
from tests.conftest import REPO, NodeProcess, dcmtk_env, dcmtk_tool, free_port, make_node
from tests.dcmqrscp import Dcmqrscp
from tests.dicomdata import CT_IMAGE, MR_IMAGE, PREFIX, dataset_bytes_of, make_instance
from tests.findcorpus import encoded
from tests.orthanc import OrthancProcess, orthanc_available

NODE_AE = "PULLNODE"
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
ROOT = PREFIX + "66."
STUDY_A, STUDY_B, STUDY_C, STUDY_D = (f"{ROOT}{n}" for n in range(1, 5))
SUMMARY = re.compile(
    r"pulled from (?P<peer>\S+): (?P<studies>\d+) stud(?:y|ies), (?P<instances>\d+) "
    r"instances?: (?P<fetched>\d+) fetched, (?P<held>\d+) already held, (?P<failed>\d+) "
    r"failed; (?P<mb>[\d.]+) MB in (?P<seconds>[\d.]+) s(, [\d.]+ instances/s)?"
)


@dataclass(frozen=True)
class StudyInfo:
    patient_id: str
    date: str
    accession: str
    series: tuple[tuple[str, str, int], ...]  # (sop class, modality, instances) per series
    compressed: bool = False  # RLE Lossless: loaded into Orthanc only (dcmqrscp refuses it)


STUDIES = {
    STUDY_A: StudyInfo("PULL-P1", "20250105", "ACC-A", ((CT_IMAGE, "CT", 3), (MR_IMAGE, "MR", 3))),
    STUDY_B: StudyInfo("PULL-P1", "20250210", "ACC-B", ((CT_IMAGE, "CT", 4),)),
    STUDY_C: StudyInfo("PULL-P2", "20250301", "ACC-C", ((MR_IMAGE, "MR", 2), (SC_IMAGE, "OT", 2))),
    STUDY_D: StudyInfo("PULL-P3", "20240601", "ACC-D", ((CT_IMAGE, "CT", 2),), compressed=True),
}


@dataclass
class Corpus:
    files: dict[str, Path] = field(default_factory=dict)  # SOP Instance UID -> Part 10 file
    studies: dict[str, list[str]] = field(default_factory=dict)  # Study UID -> SOP UIDs
    series: dict[str, list[str]] = field(default_factory=dict)  # Series UID -> SOP UIDs

    def paths(self, *studies: str) -> list[Path]:
        return [self.files[uid] for study in studies for uid in self.studies[study]]


@dataclass(frozen=True)
class Remote:
    ae_title: str
    port: int
    studies: frozenset[str]  # the study UIDs it holds


@pytest.fixture(scope="module")
def node_port() -> int:
    """The port the remotes know the node by (free when the module starts)."""
    return free_port()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    folder = tmp_path_factory.mktemp("pull-corpus")
    corpus = Corpus()
    for study, info in STUDIES.items():
        for s, (sop_class, modality, count) in enumerate(info.series, start=1):
            series = f"{study}.{s}"
            for i in range(1, count + 1):
                uid = f"{series}.{i}"
                ds = make_instance(
                    sop_class, study=study, series=series, sop_instance=uid,
                    PatientID=info.patient_id, PatientName=f"{info.patient_id}^Test",
                    StudyDate=info.date, AccessionNumber=info.accession, Modality=modality,
                    SeriesNumber=s, InstanceNumber=i,
                )
                ds.file_meta = FileMetaDataset()
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                if info.compressed:
                    ds.compress(RLELossless, encoding_plugin="pydicom",
                                generate_instance_uid=False)
                path = folder / f"{uid}.dcm"
                ds.save_as(path, enforce_file_format=True)
                corpus.files[uid] = path
                corpus.studies.setdefault(study, []).append(uid)
                corpus.series.setdefault(series, []).append(uid)
    return corpus


@pytest.fixture(scope="module")
def dcmqrscp(tmp_path_factory: pytest.TempPathFactory, corpus: Corpus,
             node_port: int) -> Iterator[Remote]:
    studies = [uid for uid, info in STUDIES.items() if not info.compressed]
    with Dcmqrscp(tmp_path_factory.mktemp("pull-dcmqrscp"),
                  destinations={NODE_AE: ("127.0.0.1", node_port)}) as server:
        server.load(corpus.paths(*studies))
        yield Remote(server.ae_title, server.port, frozenset(studies))


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, corpus: Corpus,
            node_port: int) -> Iterator[Remote]:
    if not orthanc_available():
        if os.environ.get("CI"):
            pytest.fail("Orthanc is missing; CI must install orthanc")
        pytest.skip("Orthanc not installed (apt-get install orthanc)")
    with OrthancProcess(tmp_path_factory.mktemp("pull-orthanc"),
                        modalities={NODE_AE: ("127.0.0.1", node_port)}) as server:
        # -xr: also propose RLE Lossless, for the compressed study.
        stored = subprocess.run(
            [str(dcmtk_tool("storescu")), "-xr", "-aec", server.aet, "127.0.0.1",
             str(server.dicom_port), *map(str, corpus.paths(*STUDIES))],
            capture_output=True, text=True, env=dcmtk_env(),
        )
        assert stored.returncode == 0 and "E:" not in stored.stderr, stored.stderr
        assert server.instance_count() == len(corpus.files)
        yield Remote(server.aet, server.dicom_port, frozenset(STUDIES))


@pytest.fixture
def remote(request: pytest.FixtureRequest) -> Remote:
    """The remote named by the test's parameter ("dcmqrscp" or "orthanc")."""
    found: Remote = request.getfixturevalue(request.param)
    return found


def pull_node(tmp_path: Path, node_port: int, *remotes: Remote, **settings: Any) -> NodeProcess:
    """A fresh node configuration (not started) with the remotes as peers."""
    peers = {r.ae_title: {"host": "127.0.0.1", "port": r.port} for r in remotes}
    node = make_node(tmp_path / "node", **{"ae_title": NODE_AE, "port": node_port,
                                          "peers": peers, **settings})
    node.write_config()
    return node


def pull(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node", "pull", "-c", str(node.config_path), *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )


def summary_of(done: subprocess.CompletedProcess[str]) -> dict[str, str]:
    assert "Traceback" not in done.stderr, done.stderr
    match = SUMMARY.fullmatch(done.stdout.strip().splitlines()[-1])
    assert match, (done.stdout, done.stderr)
    return match.groupdict()


def succeeded(done: subprocess.CompletedProcess[str], studies: int, instances: int,
              fetched: int, held: int = 0) -> None:
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert done.stderr == "", done.stderr  # a quick pull off a terminal: summary only
    summary = summary_of(done)
    assert [int(summary[k]) for k in ("studies", "instances", "fetched", "held", "failed")] == [
        studies, instances, fetched, held, 0], done.stdout


def one_line_error(done: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def held(node: NodeProcess) -> dict[str, tuple[str, str, str]]:
    """SOP Instance UID -> (digest, transfer syntax, source AE) of every indexed instance."""
    if not node.index_exists():
        return {}
    return {uid: (digest, syntax, source) for uid, digest, syntax, source in node.rows(
        "SELECT sop_instance_uid, digest, transfer_syntax_uid, source_ae FROM instance")}


def assert_holds_exactly(node: NodeProcess, corpus: Corpus, uids: list[str],
                         source: str) -> None:
    """The node holds these instances and no other, each as loaded into the remote, received
    from ``source``."""
    rows = held(node)
    assert sorted(rows) == sorted(uids)
    for uid in uids:
        digest, _, sender = rows[uid]
        assert sender == source
        stored = node.storage / "objects" / digest[:2] / digest[2:4] / digest
        same_dataset(stored, corpus.files[uid])


def same_dataset(stored: Path, loaded: Path) -> None:
    """Equal datasets, File Meta aside; byte-for-byte when in the same transfer syntax."""
    ours, theirs = dcmread(stored), dcmread(loaded)
    if ours.file_meta.TransferSyntaxUID == theirs.file_meta.TransferSyntaxUID:
        assert dataset_bytes_of(stored) == dataset_bytes_of(loaded)
    assert {e.tag: e.value for e in ours} == {e.tag: e.value for e in theirs}


BOTH = pytest.mark.parametrize("remote", ["dcmqrscp", "orthanc"], indirect=True)
METHODS = pytest.mark.parametrize("method", ["move", "get"])


@BOTH
@METHODS
def test_pull_one_study(remote: Remote, method: str, corpus: Corpus, node_port: int,
                        tmp_path: Path) -> None:
    node = pull_node(tmp_path, node_port, remote)
    done = pull(node, remote.ae_title, "--study", STUDY_A, "--method", method)
    succeeded(done, studies=1, instances=6, fetched=6)
    assert_holds_exactly(node, corpus, corpus.studies[STUDY_A], remote.ae_title)
    # The temporary listener of a move is gone again.
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", node_port))


@BOTH
@METHODS
def test_pull_a_patient(remote: Remote, method: str, corpus: Corpus, node_port: int,
                        tmp_path: Path) -> None:
    node = pull_node(tmp_path, node_port, remote)
    done = pull(node, remote.ae_title, "--patient-id", "PULL-P1", "--method", method)
    succeeded(done, studies=2, instances=10, fetched=10)
    assert float(summary_of(done)["mb"]) > 0
    assert_holds_exactly(node, corpus, corpus.studies[STUDY_A] + corpus.studies[STUDY_B],
                         remote.ae_title)


@METHODS
def test_compressed_instances_arrive_as_stored(orthanc: Remote, method: str, corpus: Corpus,
                                               node_port: int, tmp_path: Path) -> None:
    # The C-GET offers a context per compressed syntax, so Orthanc sends RLE as it holds it.
    node = pull_node(tmp_path, node_port, orthanc)
    succeeded(pull(node, orthanc.ae_title, "--study", STUDY_D, "--method", method),
              studies=1, instances=2, fetched=2)
    assert_holds_exactly(node, corpus, corpus.studies[STUDY_D], orthanc.ae_title)
    assert {syntax for _, syntax, _ in held(node).values()} == {RLELossless}


def preload(node: NodeProcess, corpus: Corpus, uid: str) -> str:
    """Put one instance into the node's store through its ingest path, with other content
    than the remote's (so a second fetch of it would show); returns its digest."""
    ds = dcmread(corpus.files[uid])
    ds.InstanceNumber = 99
    services = open_services(load_config(node.config_path))
    try:
        services.ingestor.receive(Received(str(ds.SOPClassUID), uid, "1.2.840.10008.1.2",
                                           encoded(ds), Source("PRELOAD", "test")))
    finally:
        services.close()
    return held(node)[uid][0]


@pytest.mark.parametrize(("remote", "method"), [("dcmqrscp", "move"), ("orthanc", "get")],
                         indirect=["remote"])
def test_an_interrupted_pull_fetches_only_the_rest(remote: Remote, method: str, corpus: Corpus,
                                                   node_port: int, tmp_path: Path) -> None:
    # duplicates: replace -> had pull fetched the held instance again, its content would change.
    node = pull_node(tmp_path, node_port, remote, duplicates="replace")
    ct_series, mr_series = f"{STUDY_A}.1", f"{STUDY_A}.2"
    first = corpus.series[ct_series][0]
    digest = preload(node, corpus, first)

    dry = pull(node, remote.ae_title, "--study", STUDY_A, "--dry-run", "--method", method)
    assert dry.returncode == 0, dry.stderr
    _, row, totals = dry.stdout.strip().splitlines()
    assert row.split()[:3] == [STUDY_A, "20250105", "ACC-A"]
    assert row.split()[4:6] == ["6", "1"]  # listed by the remote, held here
    assert "1 whole series, 2 instances of a series" in row
    assert totals == "dry run: 1 study, 6 instances, 1 already held, 5 to fetch"
    assert list(held(node)) == [first]  # a dry run fetches nothing

    done = pull(node, remote.ae_title, "--study", STUDY_A, "--method", method)
    succeeded(done, studies=1, instances=6, fetched=5, held=1)
    rows = held(node)
    assert rows.pop(first) == (digest, "1.2.840.10008.1.2", "PRELOAD")  # untouched
    assert sorted(rows) == sorted(corpus.series[ct_series][1:] + corpus.series[mr_series])
    assert {source for _, _, source in rows.values()} == {remote.ae_title}

    again = pull(node, remote.ae_title, "--study", STUDY_A, "--method", method)
    succeeded(again, studies=1, instances=6, fetched=0, held=6)


SELECTIONS = [
    (["--modality", "CT"], {STUDY_A, STUDY_B, STUDY_D}),
    (["--modality", "ot"], {STUDY_C}),  # CS values are upper case; the selector is made so
    (["--date", "20250201-"], {STUDY_B, STUDY_C}),
    (["--date", "-20250131"], {STUDY_A, STUDY_D}),
    (["--date", "20250210"], {STUDY_B}),
    (["--date", "20250101-20250228", "--modality", "MR"], {STUDY_A}),
    (["--accession", "ACC-C"], {STUDY_C}),
    (["--patient-id", "PULL-P2"], {STUDY_C}),
    (["--study", STUDY_A, "--study", STUDY_C], {STUDY_A, STUDY_C}),
    (["--all"], set(STUDIES)),
]


@BOTH
@pytest.mark.parametrize(("args", "expected"), SELECTIONS)
def test_selectors_pick_the_studies(remote: Remote, args: list[str], expected: set[str],
                                    node_port: int, tmp_path: Path) -> None:
    # dcmqrscp ignores Modalities in Study as a matching key: pull checks the series itself.
    node = pull_node(tmp_path, node_port, remote)
    done = pull(node, remote.ae_title, "--dry-run", *args)
    assert done.returncode == 0, done.stderr
    header, *rows, totals = done.stdout.strip().splitlines()
    assert header.split() == ["StudyInstanceUID", "StudyDate", "AccessionNumber", "Modalities",
                              "Instances", "Held", "Fetch"]
    assert {row.split()[0] for row in rows} == expected & remote.studies
    assert all(row.rstrip().endswith("whole study") for row in rows)
    assert totals.startswith(f"dry run: {len(rows)} stud")
    assert held(node) == {}


def test_pull_while_serve_runs_with_the_same_config(dcmqrscp: Remote, corpus: Corpus,
                                                    node_port: int, tmp_path: Path) -> None:
    node = pull_node(tmp_path, node_port, dcmqrscp).start()
    done = pull(node, dcmqrscp.ae_title, "--patient-id", "PULL-P2")
    succeeded(done, studies=1, instances=4, fetched=4)
    # The running node received them (pull could not listen on the port it holds).
    log = node.wait_for_log("association from DCMQR")
    assert log.count("status 0x0000 stored") == 4
    assert node.stop() == 0
    assert_holds_exactly(node, corpus, corpus.studies[STUDY_C], dcmqrscp.ae_title)


def test_port_held_by_another_ae_fails_the_move_but_not_a_get(
        dcmqrscp: Remote, corpus: Corpus, node_port: int, tmp_path: Path) -> None:
    other = make_node(tmp_path / "other", ae_title="OTHERNODE", port=node_port).start()
    try:
        node = pull_node(tmp_path, node_port, dcmqrscp)
        one_line_error(pull(node, dcmqrscp.ae_title, "--study", STUDY_B), 1,
                       f"cannot receive C-MOVE results as {NODE_AE}", "does not answer",
                       "Called AE title not recognised")
        assert held(node) == {}
        succeeded(pull(node, dcmqrscp.ae_title, "--study", STUDY_B, "--method", "get"),
                  studies=1, instances=4, fetched=4)
    finally:
        other.stop()


@BOTH
def test_move_destination_unknown_to_the_remote(remote: Remote, node_port: int,
                                                tmp_path: Path) -> None:
    node = pull_node(tmp_path, node_port, remote, ae_title="STRANGER")  # not known to it
    done = pull(node, remote.ae_title, "--patient-id", "PULL-P1")
    assert done.returncode == 1, (done.stdout, done.stderr)
    summary = summary_of(done)
    assert (summary["fetched"], summary["failed"]) == ("0", "10")
    line, = done.stderr.strip().splitlines()
    if remote.ae_title == "DCMQR":  # 0xA801, as PS3.4 C.4.2.1.5 says: the pull stops there
        assert "does not know the move destination STRANGER (0xA801" in line
        assert "requests)" not in line
    else:  # Orthanc answers 0xC000 to each of the two studies
        assert line.endswith("0xC000 (Unable to Process) (does ORTHANC know STRANGER as a move "
                             "destination?) (2 requests)"), line
    assert held(node) == {}


def test_remote_down_exits_1_with_one_line(node_port: int, tmp_path: Path) -> None:
    port = free_port()
    node = pull_node(tmp_path, node_port, Remote("DOWN", port, frozenset()))
    one_line_error(pull(node, "DOWN", "--all", "--timeout", "5"), 1, "cannot connect",
                   f"DOWN at 127.0.0.1:{port}")


def test_unknown_peer_exits_2_with_one_line(node_port: int, tmp_path: Path) -> None:
    node = pull_node(tmp_path, node_port)
    one_line_error(pull(node, "NOSUCHAE", "--all"), 2, "unknown peer", "NOSUCHAE")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ([], ["at least one selector", "--all"]),
        (["--all", "--patient-id", "X"], ["--all"]),
        (["--patient-id", "PULL*"], ["--patient-id", "wildcards"]),
        (["--accession", "A\\B"], ["--accession"]),
        (["--study", "1.2.x"], ["--study", "1.2.x"]),
        (["--date", "2025"], ["--date", "YYYYMMDD"]),
        (["--date", "20250231"], ["20250231 is not a date"]),
        (["--date", "20250301-20250101"], ["ends before it starts"]),
        (["--date", "-"], ["--date"]),
        (["--method", "push", "--all"], ["--method"]),
        (["--timeout", "0", "--all"], ["--timeout"]),
    ],
)
def test_bad_selectors_exit_2(args: list[str], words: list[str], node_port: int,
                              tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # In-process: these are refused before anything goes on the network.
    from node.cli import main

    node = pull_node(tmp_path, node_port, Remote("SOMEPACS", free_port(), frozenset()))
    try:
        code = main(["pull", "-c", str(node.config_path), "SOMEPACS", *args])
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code  # type: ignore[assignment]
    out, err = capsys.readouterr()
    assert code == 2, err
    assert out == ""
    assert all(word in err.strip().splitlines()[-1] for word in words), err


def test_pulling_from_the_node_itself_exits_2(node_port: int, tmp_path: Path) -> None:
    node = pull_node(tmp_path, node_port)
    one_line_error(pull(node, NODE_AE, "--all"), 2, NODE_AE, "own AE title")


def test_help_says_what_the_remote_must_know(capsys: pytest.CaptureFixture[str]) -> None:
    from node.cli import main

    with pytest.raises(SystemExit) as done:
        main(["pull", "--help"])
    assert done.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--patient-id ID", "--study UID", "--accession NUMBER", "--modality MOD",
                 "--date YYYYMMDD[-YYYYMMDD]", "--all", "--method {move,get}", "--dry-run",
                 "--timeout SECONDS", "registered as a C-MOVE destination under that AE title"):
        assert text in out, text


# --- The parts on their own: index lookups, contexts of a C-GET, the progress display ---------


def test_holdings_look_up_in_bounded_chunks(tmp_path: Path) -> None:
    from node.config import build_config
    from node.index.holdings import Holdings

    config = build_config({"ae_title": "HOLDNODE"}, tmp_path)
    items = [make_instance(study=f"{ROOT}9", series=f"{ROOT}9.1", sop_instance=f"{ROOT}9.1.{i}")
             for i in range(5)]
    services = open_services(config)
    try:
        for ds in items:
            services.ingestor.receive(Received(str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                               "1.2.840.10008.1.2", encoded(ds),
                                               Source("TEST", "test")))
        statements: list[str] = []
        connection = services.db.connection()  # type: ignore[no-untyped-call]
        connection.set_trace_callback(statements.append)
        try:
            asked = [f"{ROOT}9.1.{i}" for i in (4, 0, 7, 2, 4, 8, 1, 3)]  # 7 distinct, 2 unknown
            sizes = Holdings(services.db, chunk=2).sizes(asked)
            nothing = Holdings(services.db, chunk=2).sizes([])
        finally:
            connection.set_trace_callback(None)
    finally:
        services.close()
    assert sorted(sizes) == [f"{ROOT}9.1.{i}" for i in range(5)]
    assert all(size > 128 for size in sizes.values())
    assert nothing == {}
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 4 == len(statements)  # ceil(7 / 2), none for the empty list


def test_get_contexts_fit_the_128_limit() -> None:
    from pydicom.uid import JPEGLosslessSV1

    from node.remote.errors import RetrieveFailed
    from node.scu.retrieve import MAX_CONTEXTS, get_contexts

    model = "1.2.840.10008.5.1.4.1.2.2.3"
    contexts, roles = get_contexts(model, [CT_IMAGE])
    assert contexts[0].abstract_syntax == model
    ct = [cx for cx in contexts if cx.abstract_syntax == CT_IMAGE]
    assert ExplicitVRLittleEndian in ct[0].transfer_syntax
    assert any(cx.transfer_syntax == [RLELossless] for cx in ct)
    assert any(cx.transfer_syntax == [JPEGLosslessSV1] for cx in ct)
    assert [(r.sop_class_uid, r.scp_role, r.scu_role) for r in roles] == [(CT_IMAGE, True, False)]

    many = [f"1.2.3.{n}" for n in range(60)]
    contexts, roles = get_contexts(model, many)
    assert len(contexts) <= MAX_CONTEXTS and len(roles) == 60
    assert {cx.abstract_syntax for cx in contexts[1:]} == set(many)

    contexts, _ = get_contexts(model, [])  # SOP classes unknown: the common storage classes
    assert 100 < len(contexts) <= MAX_CONTEXTS
    with pytest.raises(RetrieveFailed, match="at most 127"):
        get_contexts(model, [f"1.2.3.{n}" for n in range(128)])


class FakeTerminal:
    def __init__(self, tty: bool) -> None:
        self.text = ""
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


def test_progress_bar_on_a_terminal() -> None:
    from node.cli_progress import ProgressBar

    now = [100.0]
    stream = FakeTerminal(tty=True)
    bar = ProgressBar(stream, clock=lambda: now[0])  # type: ignore[arg-type]
    bar.start(200)
    now[0] += 4
    bar.update(100, 2)
    assert stream.text.endswith(
        "\r\x1b[K[############............]  100/200 instances  25.0/s  2 failed  0:04")
    drawn = stream.text
    bar.update(101, 2)  # within a tenth of a second: not redrawn
    assert stream.text == drawn
    bar.finish()
    assert stream.text.endswith("\r\x1b[K")


def test_progress_off_a_terminal_is_quiet_until_the_interval() -> None:
    from node.cli_progress import ProgressBar

    now = [0.0]
    stream = FakeTerminal(tty=False)
    bar = ProgressBar(stream, clock=lambda: now[0], interval=10)  # type: ignore[arg-type]
    bar.listing(0, 3)
    bar.start(50)
    now[0] = 5
    bar.update(20, 0)
    assert stream.text == ""
    now[0] = 10
    bar.update(40, 1)
    assert stream.text == "pull: 40/50 instances, 4.0/s, 1 failed, 0:10\n"
    bar.finish()
    assert stream.text.count("\n") == 1

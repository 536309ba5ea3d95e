"""Real-world files in: every valid file bundled with pydicom is stored byte-for-byte, once.

pydicom ships ~190 test files from many vendors and toolkits (GDCM, DCMTK, pydicom itself) in
every common transfer syntax.  Which of them are *valid* for this node is decided here, in code,
from each file alone (see ``_examine``); the node must then accept every valid one, keep its
dataset bytes exactly as sent, and link it into the patient/study/series/instance index.

Several bundled files are the same instance in other transfer syntaxes (e.g. ``MR_small*.dcm``
share one SOP Instance UID).  One node holds one copy per SOP Instance UID, so the files are
dealt into *rounds*: round 0 holds the first file of every SOP Instance UID by sorted path (the
"chosen set"), round k the k-th of each UID that has more; every round goes to a node of its
own, so every valid file is sent once to a node that holds no other file with its UID.
"""

from __future__ import annotations

import re
import subprocess
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom import uid as uids
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, generate_uid
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.dsutils import split_dataset

from node.dicom.contexts import STORAGE_TRANSFER_SYNTAXES
from node.dicom.header import is_valid_uid
from tests.conftest import NodeProcess, dcmtk_env, dcmtk_tool
from tests.dicomdata import PREFIX, Sent, dataset_bytes_of, send_files

STORAGE_SOP_CLASSES = frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)
MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context IDs are odd numbers 1..255

# The transfer syntaxes the corpus must exercise.  Every one of them is present among the valid
# bundled files, so nothing had to be dropped from the list.  Not required: JPEG
# Lossless process 14 (1.2.840.10008.1.2.4.57, no bundled file); JPEG-LS near-lossless (its
# four bundled files have no Study/Series Instance UID, so they are invalid for an archive).
REQUIRED_TRANSFER_SYNTAXES = frozenset({
    uids.ImplicitVRLittleEndian,
    uids.ExplicitVRLittleEndian,
    uids.ExplicitVRBigEndian,
    uids.DeflatedExplicitVRLittleEndian,
    uids.JPEGBaseline8Bit,
    uids.JPEGExtended12Bit,
    uids.JPEGLosslessSV1,
    uids.JPEGLSLossless,
    uids.JPEG2000Lossless,
    uids.JPEG2000,
    uids.RLELossless,
})
MIN_VALID_FILES = 30

INDEX_ROWS_SQL = (
    "SELECT i.sop_instance_uid, i.sop_class_uid, i.transfer_syntax_uid, i.digest,"
    " s.series_instance_uid, st.study_instance_uid, p.patient_id, p.issuer_of_patient_id"
    " FROM instance i JOIN series s ON i.series_id = s.id"
    " JOIN study st ON s.study_id = st.id JOIN patient p ON st.patient_id = p.id"
)


@dataclass(frozen=True)
class CorpusFile:
    """A valid bundled file and what the index should say about it."""

    path: Path
    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    issuer_of_patient_id: str
    uids_encoded_as_un: bool  # SOP UIDs written with VR UN: DCMTK's storescu cannot find them


@dataclass
class Corpus:
    valid: list[CorpusFile] = field(default_factory=list)
    excluded: dict[Path, str] = field(default_factory=dict)  # file -> why it is not valid
    rounds: list[list[CorpusFile]] = field(default_factory=list)


def _text(ds: Dataset, keyword: str) -> str:
    """An element's value as the node's header reader renders it ('' when absent or empty)."""
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _native_pixel_data_cut_short(ds: Dataset, transfer_syntax: str) -> bool:
    """pydicom reads a file cut inside Pixel Data without complaint; measure it instead."""
    if "PixelData" not in ds or UID(transfer_syntax).is_compressed:
        return False
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        expected = (ds.Rows * ds.Columns * ds.get("SamplesPerPixel", 1) * frames
                    * ds.BitsAllocated + 7) // 8
    except (ValueError, TypeError, AttributeError):  # no usable image geometry: not judged
        return False
    return len(ds.PixelData) < expected


def _examine(path: Path) -> CorpusFile | str:
    """The file as a CorpusFile when it is valid for the node, else the reason it is not."""
    data = path.read_bytes()
    if data[128:132] != b"DICM":
        return "not a Part 10 file (no DICM prefix)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(path)  # the whole file, pixel data included, must parse
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError,
            NotImplementedError) as exc:
        return f"unreadable: {type(exc).__name__}: {exc}"
    # Peek at the still-raw SOP UID elements before anything converts them.
    uids_as_un = any(
        tag in ds and getattr(ds.get_item(tag), "VR", None) == "UN"
        for tag in (0x00080016, 0x00080018)
    )
    meta = ds.get("file_meta")
    if meta is None or "TransferSyntaxUID" not in meta:
        return "no File Meta Information / no Transfer Syntax UID"
    # The dataset's bytes must be well defined: (0002,0000) present and pointing exactly at
    # where the File Meta group ends (dataset_bytes_of relies on it, as does any Part 10 reader).
    try:
        meta_end = len(data) - len(dataset_bytes_of(path))
    except AssertionError:
        return "File Meta has no leading (0002,0000) group length"
    if meta_end != split_dataset(path)[1]:
        return "File Meta group length disagrees with the File Meta's extent"
    ts = str(meta.TransferSyntaxUID)
    if _native_pixel_data_cut_short(ds, ts):
        return "truncated: native Pixel Data shorter than Rows x Columns x samples x frames"
    meta_class = str(meta.get("MediaStorageSOPClassUID") or "")
    meta_instance = str(meta.get("MediaStorageSOPInstanceUID") or "")
    if ts not in STORAGE_TRANSFER_SYNTAXES:
        return f"transfer syntax {ts} is not one the node accepts"
    if meta_class not in STORAGE_SOP_CLASSES:
        return f"SOP class {meta_class!r} is not a storage SOP class pynetdicom knows"
    sop_class, sop_instance = _text(ds, "SOPClassUID"), _text(ds, "SOPInstanceUID")
    if (sop_class, sop_instance) != (meta_class, meta_instance):
        return "dataset SOP Class/Instance UID missing or different from the File Meta's"
    if not is_valid_uid(sop_instance):
        return f"SOP Instance UID {sop_instance!r} is not a valid UID"
    study, series = _text(ds, "StudyInstanceUID"), _text(ds, "SeriesInstanceUID")
    if not (is_valid_uid(study) and is_valid_uid(series)):
        return f"Study/Series Instance UID missing or invalid ({study!r}, {series!r})"
    return CorpusFile(
        path=path, transfer_syntax=ts, sop_class_uid=sop_class, sop_instance_uid=sop_instance,
        study_instance_uid=study, series_instance_uid=series,
        patient_id=_text(ds, "PatientID"),
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
        uids_encoded_as_un=uids_as_un,
    )


def _bundled_files() -> list[Path]:
    """pydicom's bundled test files: every *.dcm and every extensionless file, sorted by path.

    get_testdata_files() lists only files that are present locally (nothing is downloaded);
    files kept elsewhere (Git LFS, the optional pydicom-data package) are simply absent.
    """
    paths = {Path(p) for p in get_testdata_files()}
    return sorted(p for p in paths if p.is_file() and (p.suffix == ".dcm" or p.suffix == ""))


@cache
def corpus() -> Corpus:
    result = Corpus()
    for path in _bundled_files():
        examined = _examine(path)
        if isinstance(examined, str):
            result.excluded[path] = examined
        else:
            result.valid.append(examined)
    # Files sharing a SOP Instance UID go to different rounds (nodes): round k gets the k-th
    # file of each UID by sorted path, so round 0 keeps the first one of every UID.
    by_uid: dict[str, list[CorpusFile]] = defaultdict(list)
    for item in result.valid:  # already in path order
        by_uid[item.sop_instance_uid].append(item)
    depth = max((len(group) for group in by_uid.values()), default=0)
    for k in range(depth):
        members = sorted((g[k] for g in by_uid.values() if len(g) > k), key=lambda f: f.path)
        # PS3.4 C.6.1.1: a series belongs to one study; the node answers 0xA900 to an instance
        # whose Series Instance UID it already holds under another Study Instance UID
        # (node/index/writer.py, IndexWriter._series_for).  Keep the first such file by path.
        study_of: dict[str, tuple[str, Path]] = {}
        chosen: list[CorpusFile] = []
        for item in members:
            owner = study_of.setdefault(item.series_instance_uid,
                                        (item.study_instance_uid, item.path))
            if owner[0] != item.study_instance_uid:
                result.excluded[item.path] = (
                    f"Series Instance UID also used under another Study UID by {_name(owner[1])}"
                )
                continue
            chosen.append(item)
        result.rounds.append(chosen)
    result.valid = [f for f in result.valid if f.path not in result.excluded]
    return result


def _context_batches(files: Sequence[CorpusFile]) -> list[list[CorpusFile]]:
    """Consecutive batches whose (SOP class, transfer syntax) pairs fit in one association."""
    batches: list[list[CorpusFile]] = []
    pairs: set[tuple[str, str]] = set()
    for item in files:
        pair = (item.sop_class_uid, item.transfer_syntax)
        if not batches or (pair not in pairs and len(pairs) == MAX_CONTEXTS):
            batches.append([])
            pairs = set()
        pairs.add(pair)
        batches[-1].append(item)
    return batches


def _stored_by_uid(node: NodeProcess) -> dict[str, list[Path]]:
    """The node's stored files grouped by the SOP Instance UID in their File Meta."""
    stored: dict[str, list[Path]] = defaultdict(list)
    for path in node.stored_files():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # some bundled files have odd encodings
            meta = dcmread(path, stop_before_pixels=True, specific_tags=[]).file_meta
        stored[str(meta.MediaStorageSOPInstanceUID)].append(path)
    return stored


def _expected_dataset_bytes(source: Path, transfer_syntax: str, via_dcmtk: bool) -> bytes:
    data = dataset_bytes_of(source)
    # DCMTK pads an odd-length deflate bitstream with one NUL byte when it puts the dataset on
    # the wire (values and PDVs are even-length); the file it read has no pad.  That byte is
    # what the node received, so it is what the node must keep.
    if via_dcmtk and transfer_syntax == uids.DeflatedExplicitVRLittleEndian and len(data) % 2:
        data += b"\x00"
    return data


def _assert_stored_and_indexed(node: NodeProcess, sent: Sequence[CorpusFile],
                               sources: dict[str, Path] | None = None,
                               via_dcmtk: bool = False) -> None:
    """Each sent instance: one stored file with its dataset bytes, one row linked correctly.

    ``sources`` maps SOP Instance UID to the file actually sent when that is not ``item.path``.
    """
    stored = _stored_by_uid(node)
    rows: dict[str, list[tuple[object, ...]]] = defaultdict(list)
    for row in node.rows(INDEX_ROWS_SQL):
        rows[str(row[0])].append(row)
    # A study keeps the patient of the first instance that named it (node/index/writer.py),
    # so the expected patient of every instance is that of the first file sent in its study.
    first_patient: dict[str, tuple[str, str]] = {}
    for item in sent:
        first_patient.setdefault(item.study_instance_uid,
                                 (item.patient_id, item.issuer_of_patient_id))
    problems: list[str] = []
    for item in sent:
        name, uid = _name(item.path), item.sop_instance_uid
        source = (sources or {}).get(uid, item.path)
        files = stored.get(uid, [])
        if len(files) != 1:
            problems.append(f"{name}: {len(files)} stored files for {uid}")
            continue
        if dataset_bytes_of(files[0]) != _expected_dataset_bytes(source, item.transfer_syntax,
                                                                 via_dcmtk):
            problems.append(f"{name}: stored dataset bytes differ from the sent file's")
        if len(rows.get(uid, [])) != 1:
            problems.append(f"{name}: {len(rows.get(uid, []))} index rows for {uid}")
            continue
        row = rows[uid][0]
        expected = (uid, item.sop_class_uid, item.transfer_syntax, files[0].name,
                    item.series_instance_uid, item.study_instance_uid,
                    *first_patient[item.study_instance_uid])
        if tuple(row) != expected:
            problems.append(f"{name}: index row {row} != expected {expected}")
    assert not problems, "\n".join(problems)


def _send_round(node: NodeProcess, files: Sequence[CorpusFile]) -> list[Sent]:
    results: list[Sent] = []
    for batch in _context_batches(files):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's remarks on reading odd File Meta
            results += send_files(node.port, [f.path for f in batch])
    return results


def _name(path: Path) -> str:
    """A bundled file's path below pydicom's test_files folder (names repeat in subfolders)."""
    parts = path.parts
    return "/".join(parts[parts.index("test_files") + 1:]) if "test_files" in parts else path.name


def _describe(files: Sequence[CorpusFile]) -> str:
    return ", ".join(sorted({uids.UID(f.transfer_syntax).keyword or f.transfer_syntax
                             for f in files}))


# ---------------------------------------------------------------------------------------------
# 1. Every valid bundled file, through pynetdicom, byte-for-byte
# ---------------------------------------------------------------------------------------------


def test_corpus_is_large_and_covers_the_transfer_syntaxes() -> None:
    found = corpus()
    summary = (
        f"{len(found.valid)} valid bundled files in {len(found.rounds)} rounds "
        f"(round 0, one file per SOP Instance UID: {len(found.rounds[0]) if found.rounds else 0}"
        f"), {len(found.excluded)} excluded"
    )
    print(summary)
    for path, reason in sorted(found.excluded.items()):
        print(f"  excluded {_name(path)}: {reason}")
    assert len(found.valid) >= MIN_VALID_FILES, summary
    assert found.rounds and len(found.rounds[0]) >= MIN_VALID_FILES, summary
    assert sum(len(r) for r in found.rounds) == len(found.valid)
    # Coverage counts every round: each round is sent (test below), each to its own node.  Round
    # 0 alone lacks Implicit VR LE and JPEG-LS lossless: every bundled file in those syntaxes
    # (MR_small_implicit, SC_rgb_jpeg_dcmd, MR_small_jpeg_ls_lossless) repeats the SOP Instance
    # UID of a file that sorts before it.
    present = {f.transfer_syntax for f in found.valid}
    missing = sorted(REQUIRED_TRANSFER_SYNTAXES - present)
    assert not missing, (
        f"no valid bundled file in {missing}; {summary}; have {_describe(found.valid)}"
    )


@pytest.mark.parametrize("round_index", range(len(corpus().rounds)))
def test_every_valid_bundled_file_is_stored_byte_for_byte_once(
    round_index: int, request: pytest.FixtureRequest,
    node_factory: Callable[..., NodeProcess],
) -> None:
    files = corpus().rounds[round_index]
    assert files
    if round_index == 0:  # the chosen set: one file per SOP Instance UID
        node: NodeProcess = request.getfixturevalue("shared_node")
    else:  # same UIDs as round 0 in other encodings: a node of their own
        node = node_factory(f"round{round_index}").start()

    results = _send_round(node, files)

    assert [r.sop_instance_uid for r in results] == [f.sop_instance_uid for f in files]
    failed = [
        f"{_name(f.path)} ({_describe([f])}): status "
        f"{'none' if r.status is None else f'0x{r.status:04X}'} {r.comment}"
        for f, r in zip(files, results, strict=True) if r.status != 0
    ]
    assert not failed, f"{len(failed)} of {len(files)} valid files rejected:\n" + "\n".join(
        failed) + f"\nnode log:\n{node.log()[-4000:]}"
    _assert_stored_and_indexed(node, files)
    if round_index > 0:  # an isolated node: exact global counts hold too
        assert len(node.stored_files()) == len(files)
        assert node.rows("SELECT count(*) FROM instance") == [(len(files),)]
    assert node.temporary_files() == []


# ---------------------------------------------------------------------------------------------
# 2. The acceptance command: DCMTK storescu +sd +r over a mixed folder
# ---------------------------------------------------------------------------------------------


def _pick_one_per_transfer_syntax() -> list[tuple[CorpusFile, bool]]:
    """One valid file per required transfer syntax, all with distinct SOP Instance UIDs.

    Returns (file, needs_new_uid).  Files whose SOP UIDs are encoded with VR UN are skipped:
    storescu does not reinterpret UN and stops with "No SOP Class or Instance UID in file".
    The most constrained syntaxes pick first; when every candidate's UID is taken already
    (RLE: every bundled RLE file DCMTK can read shares its UID with the only JPEG-LS lossless
    or the only JPEG lossless SV1 file), the first candidate is copied under a new UID.
    """
    candidates: dict[str, list[CorpusFile]] = defaultdict(list)
    for item in corpus().valid:
        if item.transfer_syntax in REQUIRED_TRANSFER_SYNTAXES and not item.uids_encoded_as_un:
            candidates[item.transfer_syntax].append(item)
    missing = sorted(REQUIRED_TRANSFER_SYNTAXES - set(candidates))
    assert not missing, f"no storescu-readable valid bundled file in {missing}"
    taken: set[str] = set()
    study_of: dict[str, str] = {}
    picked: list[tuple[CorpusFile, bool]] = []
    for ts in sorted(candidates, key=lambda t: (len(candidates[t]), t)):
        fits = [
            c for c in candidates[ts]
            if c.sop_instance_uid not in taken
            and study_of.get(c.series_instance_uid, c.study_instance_uid) == c.study_instance_uid
        ]
        choice, new_uid = (fits[0], False) if fits else (candidates[ts][0], True)
        if not new_uid:
            taken.add(choice.sop_instance_uid)
        study_of.setdefault(choice.series_instance_uid, choice.study_instance_uid)
        picked.append((choice, new_uid))
    return picked


def _dcmtk_canonical_copy(source: Path, target: Path, staging: Path,
                          new_uid: str | None) -> CorpusFile:
    """Copy ``source`` to ``target`` as DCMTK writes it, optionally under a new SOP UID.

    storescu does not send a file's bytes: it parses the file and encodes the dataset again
    (recalculating group lengths, dropping (FFFC,FFFC) trailing padding, normalising sequence
    lengths).  Writing the copy with DCMTK's own dcmconv (same transfer syntax, no padding)
    gives files that storescu puts on the wire unchanged, so "stored bytes == source bytes"
    stays a meaningful, exact check on the node.
    """
    if new_uid is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(source)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uids.UID(new_uid)
        staging.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(staging, enforce_file_format=True)
        source = staging
    target.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [str(dcmtk_tool("dcmconv")), "-p", str(source), str(target)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, f"dcmconv {source.name}: {done.stderr}"
    copy = _examine(target)
    assert isinstance(copy, CorpusFile), f"DCMTK copy of {source.name} is not valid: {copy}"
    return copy


def _storescu_profile(files: Sequence[CorpusFile], path: Path) -> Path:
    """A storescu config (-xf) proposing one context per (SOP class, transfer syntax) sent."""
    pairs = sorted({(f.sop_class_uid, f.transfer_syntax) for f in files})
    syntaxes = sorted({ts for _, ts in pairs})
    lines = ["[[TransferSyntaxes]]"]
    for i, ts in enumerate(syntaxes):
        lines += [f"[TS{i}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[Corpus]"]
    for i, (sop_class, ts) in enumerate(pairs, start=1):
        lines.append(f"PresentationContext{i} = {sop_class}\\TS{syntaxes.index(ts)}")
    lines += ["[[Profiles]]", "[Corpus]", "PresentationContexts = Corpus"]
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    return path


def _errors(stderr: str) -> list[str]:
    """DCMTK's error and fatal log lines (warnings such as odd pixel data lengths are fine)."""
    return [line for line in stderr.splitlines() if re.match(r"^[EF]: ", line)]


def test_storescu_recursive_mixed_folder_stores_every_transfer_syntax_once(
    node: NodeProcess, tmp_path: Path
) -> None:
    storescu = dcmtk_tool("storescu")
    folder = tmp_path / "mixed"
    sent: list[CorpusFile] = []
    for i, (item, needs_new_uid) in enumerate(_pick_one_per_transfer_syntax()):
        keyword = uids.UID(item.transfer_syntax).keyword
        # Top level, one level and two levels deep, so +r recursion is exercised.
        sub = [Path(), Path(keyword), Path(f"level{i % 2}") / keyword][i % 3]
        new_uid = generate_uid(PREFIX, entropy_srcs=[item.path.name]) if needs_new_uid else None
        print(f"{keyword}: {_name(item.path)}" + (" (under a new SOP Instance UID)"
                                                   if needs_new_uid else ""))
        sent.append(_dcmtk_canonical_copy(
            item.path, folder / sub / item.path.name, tmp_path / "staging" / item.path.name,
            new_uid,
        ))
    assert {f.transfer_syntax for f in sent} == REQUIRED_TRANSFER_SYNTAXES
    assert len({f.sop_instance_uid for f in sent}) == len(sent)
    assert len(list(folder.rglob("*.dcm"))) == len(sent)

    # The command plus -xf.  By default storescu 3.6.7 proposes all 128 of its storage
    # SOP classes with uncompressed syntaxes only, and then tries (and fails: "unable to convert
    # dataset from 'JPEG 2000' transfer syntax to 'Little Endian Explicit'") to decompress; -R
    # still proposes uncompressed syntaxes only, and each -x? option adds just one compressed
    # syntax.  A config profile with one context per (SOP class, transfer syntax) in the folder
    # lets storescu send every file in its own transfer syntax, untranscoded.
    profile = _storescu_profile(sent, tmp_path / "storescu.cfg")
    done = subprocess.run(
        [str(storescu), "-xf", str(profile), "Corpus", "-aec", "DICOMNODE", "127.0.0.1",
         str(node.port), "+sd", "+r", str(folder)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr + node.log()[-3000:]
    assert _errors(done.stderr) == [], done.stderr

    assert len(node.stored_files()) == len(sent)
    assert node.rows("SELECT count(*) FROM instance") == [(len(sent),)]
    assert sorted(r[0] for r in node.rows(INDEX_ROWS_SQL)) == sorted(
        f.sop_instance_uid for f in sent
    )
    _assert_stored_and_indexed(node, sent, via_dcmtk=True)
    assert node.temporary_files() == []


# ---------------------------------------------------------------------------------------------
# 3. The same file twice in one association
# ---------------------------------------------------------------------------------------------


def test_storescu_same_file_twice_in_one_association_is_one_file_one_row(
    node: NodeProcess, tmp_path: Path
) -> None:
    storescu = dcmtk_tool("storescu")
    item = next(
        f for f in corpus().rounds[0]
        if f.transfer_syntax == uids.ExplicitVRLittleEndian and not f.uids_encoded_as_un
    )
    copy = _dcmtk_canonical_copy(item.path, tmp_path / "send" / item.path.name,
                                 tmp_path / "staging" / item.path.name, None)
    done = subprocess.run(
        [str(storescu), "-v", "-aec", "DICOMNODE", "127.0.0.1", str(node.port),
         str(copy.path), str(copy.path)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=60,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert _errors(output) == [], output
    assert output.count("Association Accepted") == 1, output  # one association ...
    assert output.count("Received Store Response (Success)") == 2, output  # ... two stores

    assert len(node.stored_files()) == 1
    assert node.rows("SELECT count(*) FROM instance") == [(1,)]
    _assert_stored_and_indexed(node, [copy], via_dcmtk=True)
    assert Counter(r[0] for r in node.rows(INDEX_ROWS_SQL)) == {copy.sop_instance_uid: 1}
    assert node.temporary_files() == []


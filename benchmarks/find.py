#!/usr/bin/env python3
"""C-FIND benchmark: query latency of the node on a large index, over the network.

1. **Fill** an index of ``--instances`` N instances (default 1,000,000) straight through the
   index layer: no network and no files.  The store and its SQLite database are created by the
   node's own code (``build_config`` + ``open_services``), then the four tables are filled in
   bulk with peewee ``insert_many`` in large transactions.  The data are generated with a fixed
   seed: N/50 patients (20,000 for 1M) named from ~500 family names (mixed case and non-ASCII
   ones among them: Müller, Øster, Łukasz…), ~3 studies each over 2015-2026, ~4 series per
   study (CT/MR/US/CR/DX, with SR dose reports and PR presentation states), and the instances
   spread over the series so that the total is exactly N: ~35 % in series of 500 images, the
   rest in many small ones.  The filled store is cached in ``--db`` and reused when its
   instance count and generator version match.
2. **Start** the node as ``python -m node serve -c CONFIG`` from the repository root on that
   store, and wait (polling, with a deadline) until it answers C-ECHO.
3. **Query** over ONE association kept open (pynetdicom SCU, Nagle off): each query runs once
   to warm up and to check the answers against the database, then ``--repeat`` R times timed.
   For each: matches; the node's own time (median of what its INFO log line says, from the
   request to the final response sent) and its CPU per query; and as the SCU sees it: first
   (cold) time, median and p95, and the median beyond a C-ECHO round trip on the same
   association.  With hundreds of matches the pynetdicom SCU, which decodes every response,
   is the slower side: the node's own time is the figure that measures the node.

The expected answers are computed from the SQLite file directly (not through the node), so
the benchmark also reports wrong counts, missing return keys and wrong values.

Example::

    python benchmarks/find.py --instances 1000000 --json /tmp/find.json

Exit status: 0 when every query succeeded with the expected answers, 1 otherwise (the node
does not support C-FIND, a query failed, an answer was wrong), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import random
import re
import shutil
import socket
import sqlite3
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

from common import (
    HOST,
    REPO,
    BenchError,
    NodeServer,
    cpu_model,
    interrupts_stop_children,
    kernel,
    nproc,
    process_cpu_seconds,
    python_version,
    render_table,
)

NODE_AET = "DICOMNODE"
SCU_AET = "FINDBENCH"

GENERATOR_VERSION = 1  # bump when the generated data change, so cached stores are rebuilt
MANIFEST = "find-bench.json"  # inside the storage directory, next to index.sqlite
SEED = 20261122
INSTANCES_PER_PATIENT = 50  # 1,000,000 instances -> 20,000 patients
TARGET_PATIENT = 777  # the patient (index, modulo the patient count) the queries aim at
BIG_SERIES = 500  # images in a big series
BIG_SHARE = 0.35  # share of all instances held in big series
NAME_PREFIX = "MÜLL"  # the PatientName wildcard query is NAME_PREFIX + "*"
DATE_RANGE = ("20230101", "20230131")
FIRST_DAY, LAST_DAY = date(2015, 1, 1), date(2026, 12, 31)
UID_ROOT = "1.2.826.0.1.3680043.8.498.9.20261122"  # pydicom's root + this benchmark's arc
STATEMENT_ROWS = 5000  # rows per INSERT statement (fewer when the table has many columns)
SQLITE_MAX_VARIABLES = 32766  # SQLite >= 3.32 default
TRANSACTION_ROWS = 50_000  # instance rows per committed transaction while filling
SCU_POLL = 0.0001  # seconds: the SCU's DUL poll interval while measuring (pynetdicom: 0.001)

PENDING = (0xFF00, 0xFF01)

# --------------------------------------------------------------------------------------------
# generated data: names and vocabularies

_FAMILY_TEXT = """
Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez
Gonzalez Wilson Anderson Thomas Taylor Moore Jackson Martin Lee Perez Thompson White Harris
Sanchez Clark Ramirez Lewis Robinson Walker Young Allen King Wright Scott Torres Nguyen Hill
Flores Green Adams Nelson Baker Hall Rivera Campbell Mitchell Carter Roberts Müller Müllner
Müllenbach Mueller Muller Schmidt Schneider Fischer Weber Meyer Wagner Becker Schulz Hoffmann
Schäfer Koch Bauer Richter Klein Wolf Schröder Neumann Schwarz Zimmermann Braun Krüger Hofmann
Hartmann Lange Schmitt Werner Krause Meier Lehmann Schmid Schulze Maier Köhler Herrmann König
Walter Mayer Huber Kaiser Fuchs Peters Lang Scholz Möller Weiß Jung Hahn Vogel Friedrich
Keller Günther Frank Berger Winkler Roth Beck Lorenz Baumann Franke Albrecht Schuster Simon
Ludwig Böhm Winter Kraus Martín Jiménez Ruiz Díaz Álvarez Moreno Muñoz Romero Alonso Gutiérrez
Navarro Domínguez Vázquez Ramos Gil Serrano Blanco Suárez Molina Castro Ortega Delgado Ortiz
Rubio Marín Sanz Núñez Iglesias Medina Garrido Santos Castillo Cortés Lozano Guerrero Cano
Prieto Méndez Calvo Gallego Vidal León Márquez Herrera Peña Cabrera Flores Campos Vega Fuentes
Carrasco Diez Reyes Caballero Nieto Aguilar Pascual Santana Herrero Montero Lorente Hidalgo
Giménez Ibáñez Ferrer Durán Santiago Benítez Mora Vicente Vargas Arias Carmona Crespo Román
Pastor Soto Sáez Velasco Moya Soler Parra Esteban Bravo Gallardo Rojas Øster Østergaard
Sørensen Jørgensen Ødegård Åberg Ångström Nyström Lindström Söderberg Bergström Holmgren
Łukasz Wójcik Kowalczyk Wiśniewski Dąbrowski Lewandowski Zieliński Szymański Woźniak Kozłowski
Jankowski Mazur Kwiatkowski Krawczyk Piotrowski Grabowski Nowakowski Pawłowski Michalski
Dvořák Novák Svoboda Černý Procházka Kučera Veselý Horák Němec Pokorný Marek Pospíšil
Hájek Jelínek Král Růžička Beneš Fiala Sedláček Doležal Zeman Kolář Navrátil Čermák
Kovács Szabó Tóth Horváth Varga Kiss Molnár Németh Farkas Balogh Papp Takács Juhász
Lakatos Mészáros Oláh Simon Rácz Fekete McDonald MacLeod McKenzie O'Brien O'Connor O'Neill
DeVries DiMarco LeBlanc DuPont van_Dijk van_der_Berg de_Jong de_Vries Bakker Janssen Visser
Smit Meijer de_Boer Mulder de_Groot Bos Vos Peters Hendriks van_Leeuwen Dekker Brouwer
de_Wit Dijkstra Smits de_Graaf van_der_Meer Rossi Russo Ferrari Esposito Bianchi Romano
Colombo Ricci Marino Greco Bruno Gallo Conti De_Luca Mancini Costa Giordano Rizzo Lombardi
Moretti Barbieri Fontana Santoro Mariani Rinaldi Caruso Ferrara Galli Martini Leone Longo
Gentile Martinelli Vitale Lombardo Serra Coppola De_Santis D'Angelo Marchetti Parisi Villa
Conte Ferraro Ferri Fabbri Bianco Marini Grasso Valentini Messina Sala De_Angelis Gatti
Pellegrini Palumbo Sanna Farina Rizzi Monti Cattaneo Morelli Amato Silvestri Mazza Testa
Dubois Durand Lefebvre Leroy Moreau Laurent Girard Bonnet Dupont Lambert Fontaine Rousseau
Vincent Muller Faure André Mercier Blanc Guérin Boyer Garnier Chevalier François Legrand
Gauthier Perrin Robin Clément Morin Nicolas Henry Roussel Mathieu Gautier Masson Marchand
Duval Denis Lemaire Dumont Noël Meyer Brunet Rolland Lucas Barbier Aubert Rey Giraud
Tanaka Suzuki Takahashi Watanabe Itō Yamamoto Nakamura Kobayashi Katō Yoshida Yamada Sasaki
Yamaguchi Matsumoto Inoue Kimura Hayashi Shimizu Yamazaki Mori Abe Ikeda Hashimoto Ishikawa
Ogawa Okada Gotō Hasegawa Murakami Kondō Ishii Saitō Sakamoto Endō Aoki Fujii Nishimura
Kim Park Choi Jeong Kang Cho Yoon Jang Lim Han Oh Seo Shin Kwon Hwang Ahn Song Ryu Hong
Wang Li Zhang Liu Chen Yang Huang Zhao Wu Zhou Xu Sun Ma Zhu Hu Guo He Gao Lin Luo
Papadopoulos Nikolaidis Georgiou Oikonomou Ioannou Christodoulou Kaya Demir Şahin
Çelik Öztürk Özdemir Arslan Doğan Aslan Çetin Kara Koç Kurt
Ivanov Smirnov Kuznetsov Popov Vasiliev Petrov Sokolov Mikhailov Novikov Fedorov Morozov
Volkov Alekseev Lebedev Semenov Egorov Pavlov Kozlov Stepanov Nikolaev Orlov Andreev
Korhonen Virtanen Mäkinen Nieminen Mäkelä Hämäläinen Laine Heikkinen Koskinen Järvinen
Murphy Kelly Sullivan Walsh Byrne Ryan Gallagher Doherty Kennedy Lynch Murray Quinn Moore
Silva Santos Ferreira Pereira Oliveira Costa Rodrigues Martins Jesus Sousa Fernandes Gonçalves
Gomes Lopes Marques Alves Almeida Ribeiro Pinto Carvalho Teixeira Moreira Correia Mendes
Nunes Soares Vieira Monteiro Cardoso Rocha Raposo Neves Coelho Cruz Cunha Pires Ramos Reis
Simões Antunes Matos Fonseca Machado Araújo Barbosa Tavares Lourenço Castro Figueiredo Azevedo
Freitas Jansen Hansen Nielsen Pedersen Andersen Christensen Larsen Rasmussen Johansen
Olsen Thomsen Poulsen Johannsen Knudsen Mortensen Møller Eriksson Karlsson Nilsson Larsson
Olsson Persson Svensson Gustafsson Pettersson Jonsson Jansson Hansson Bengtsson Jönsson
"""

_GIVEN_TEXT = """
JAMES MARY JOHN PATRICIA ROBERT JENNIFER MICHAEL LINDA WILLIAM ELIZABETH DAVID BARBARA
RICHARD SUSAN JOSEPH JESSICA THOMAS SARAH CHARLES KAREN HANS ANNA PETER MARIA KLAUS
MONIKA JÜRGEN SABINE JÖRG BÄRBEL JOSÉ MARÍA JESÚS ÁNGELES ÁLVARO INÉS SØREN ÅSE BJØRN
ÆRWIN ŁUKASZ MAŁGORZATA WOJCIECH AGNIESZKA JIŘÍ ZDEŇKA TOMÁŠ LUCIE ISTVÁN ERZSÉBET ZOLTÁN
ÉVA FRANÇOIS HÉLÈNE RENÉ CÉLINE GIUSEPPE FRANCESCA MARCO CHIARA JAN EMMA SEM TESS
HIROSHI YUKI KENJI AIKO MIN-JUN SEO-YEON WEI FANG OLIVER ZOË NOËL ANDRÉ JOÃO CONCEIÇÃO
MEHMET AYŞE MUSTAFA FATMA IVAN OLGA MATTI AINO SEÁN AOIFE LARS INGRID ERIK KARIN SVEN
"""


def _words(text: str) -> list[str]:
    """Whitespace-separated names; '_' stands for a space inside a name."""
    return [word.replace("_", " ") for word in text.split()]


# Turkish dotless i (U+0131) casefolds to itself, not to "i"
_FAMILY_NAMES = [*_words(_FAMILY_TEXT), "Y\u0131lmaz", "Ayd\u0131n", "K\u0131l\u0131\u00e7"]
_GIVEN_NAMES = _words(_GIVEN_TEXT)


def family_names() -> list[str]:
    """500 distinct family names: every non-ASCII or unusually written one, then plain ones."""
    names = list(dict.fromkeys(_FAMILY_NAMES))
    special = [n for n in names if not n.isascii() or not n.isalpha() or not n[1:].islower()]
    plain = [n for n in names if n not in special]
    return special + plain[: 500 - len(special)]


# modality -> SOP Class UID, typical size in bytes, series descriptions
_SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
    "SR": "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR
    "PR": "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
}
_SIZE = {"CT": 527_000, "MR": 140_000, "US": 620_000, "CR": 8_400_000, "DX": 10_200_000,
         "SR": 24_000, "PR": 6_000}
_SERIES_DESCRIPTION = {
    "CT": ["AXIAL 5mm", "AXIAL 1mm", "CORONAL MPR", "SAGITTAL MPR", "TOPOGRAM", "ARTERIAL"],
    "MR": ["T1 SAG", "T2 AX", "FLAIR AX", "DWI", "T1 AX +C", "SWI"],
    "US": ["B-MODE", "DOPPLER", "CINE"],
    "CR": ["PA", "LATERAL", "AP"],
    "DX": ["PA", "LAT", "OBLIQUE"],
    "SR": ["Dose Report"],
    "PR": ["Key Images", "Annotations"],
}
_TRANSFER_SYNTAX = {
    "CT": ["1.2.840.10008.1.2.1"] * 3 + ["1.2.840.10008.1.2"],
    "MR": ["1.2.840.10008.1.2.1"] * 3 + ["1.2.840.10008.1.2.4.90"],
    "US": ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.1"],
    "CR": ["1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.1"],
    "DX": ["1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.90"],
    "SR": ["1.2.840.10008.1.2.1"],
    "PR": ["1.2.840.10008.1.2.1"],
}
_SOURCE_AE = {"CT": ["CT_SOMATOM", "CT_REVOLUTION"], "MR": ["MR_PRISMA", "MR_INGENIA"],
              "US": ["US_LOGIQ", "US_EPIQ"], "CR": ["CR_FCR"], "DX": ["DX_YSIO", "DX_DRX"],
              "SR": ["CT_SOMATOM", "CT_REVOLUTION"], "PR": ["PACS_VIEWER"]}


@dataclass(frozen=True)
class StudyKind:
    description: str
    modality: str
    body_part: str
    images: tuple[int, int]  # number of image series, lowest and highest
    weight: float


_STUDY_KINDS = [
    StudyKind("CT CHEST WITH CONTRAST", "CT", "CHEST", (2, 5), 0.12),
    StudyKind("CT HEAD WITHOUT CONTRAST", "CT", "HEAD", (2, 4), 0.10),
    StudyKind("CT ABDOMEN PELVIS", "CT", "ABDOMEN", (3, 5), 0.13),
    StudyKind("MR BRAIN", "MR", "BRAIN", (4, 6), 0.12),
    StudyKind("MR KNEE LEFT", "MR", "KNEE", (3, 5), 0.07),
    StudyKind("MR LUMBAR SPINE", "MR", "LSPINE", (3, 5), 0.06),
    StudyKind("US ABDOMEN", "US", "ABDOMEN", (1, 3), 0.09),
    StudyKind("US THYROID", "US", "NECK", (1, 2), 0.06),
    StudyKind("CR CHEST 2 VIEWS", "CR", "CHEST", (1, 3), 0.10),
    StudyKind("DX HAND RIGHT", "DX", "HAND", (1, 3), 0.08),
    StudyKind("DX FOOT LEFT", "DX", "FOOT", (1, 3), 0.07),
]
_PHYSICIANS = ["HOUSE^GREGORY", "Grey^Meredith", "WHO^JOHN^^DR", "Dvořák^Antonín", "", "",
               "Østergaard^Kirsten", "García Márquez^Gabriel", "O'Malley^Patrick", "KILDARE^J"]


# --------------------------------------------------------------------------------------------
# generated data: structure


@dataclass
class GenPatient:
    index: int
    patient_id: str
    name: str
    birth_date: str
    sex: str
    charset: str


@dataclass
class GenStudy:
    id: int
    uid: str
    patient: int  # GenPatient.index
    kind: StudyKind
    date: str
    time: str
    when: datetime


@dataclass
class GenSeries:
    id: int
    uid: str
    study: GenStudy
    modality: str
    number: int
    instances: int = 0


@dataclass
class Archive:
    """The whole generated archive except the instance rows (those are streamed)."""

    patients: list[GenPatient]
    studies: list[GenStudy]
    series: list[GenSeries]
    big_series: int
    target_series: int  # GenSeries.id of the 500-image series of the target patient


def charset_for(text: str) -> str:
    if text.isascii():
        return ""
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return "ISO_IR 192"
    return "ISO_IR 100"


def patient_count(instances: int) -> int:
    return max(1, round(instances / INSTANCES_PER_PATIENT))


def target_patient_index(patients: int) -> int:
    return TARGET_PATIENT % patients


def generate(instances: int) -> Archive:
    """Patients, studies and series with exact instance counts per series (seeded)."""
    rng = random.Random(SEED)
    families, patients = family_names(), patient_count(instances)
    target = target_patient_index(patients)
    days = (LAST_DAY - FIRST_DAY).days + 1
    kinds, weights = _STUDY_KINDS, [k.weight for k in _STUDY_KINDS]
    gen_patients: list[GenPatient] = []
    studies: list[GenStudy] = []
    series: list[GenSeries] = []
    target_series = 0
    for p in range(patients):
        family, given = rng.choice(families), rng.choice(_GIVEN_NAMES)
        # DICOM names are most often in capitals; some systems send them as written
        name = f"{family.upper()}^{given}" if rng.random() < 0.75 else f"{family}^{given.title()}"
        birth = FIRST_DAY - timedelta(days=rng.randrange(365 * 2, 365 * 95))
        sex = rng.choices("MFO", weights=(48, 50, 2))[0]
        gen_patients.append(
            GenPatient(p, f"PID{p:07d}", name, birth.strftime("%Y%m%d"), sex, charset_for(name))
        )
        for s in range(rng.choice((1, 2, 2, 3, 3, 3, 3, 4, 4, 5))):
            kind = rng.choices(kinds, weights=weights)[0]
            if p == target and s == 0:
                kind = kinds[0]  # the target's first study is a CT with a big series first
            when = datetime.combine(FIRST_DAY, datetime.min.time()) + timedelta(
                days=rng.randrange(days), seconds=rng.randrange(7 * 3600, 20 * 3600)
            )
            study = GenStudy(
                len(studies) + 1, f"{UID_ROOT}.1.{p}.{s + 1}", p, kind,
                when.strftime("%Y%m%d"), when.strftime("%H%M%S"), when,
            )
            studies.append(study)
            modalities = [kind.modality] * rng.randint(*kind.images)
            if kind.modality == "CT" and rng.random() < 0.8:
                modalities.append("SR")
            if kind.modality == "US" and rng.random() < 0.6:
                modalities.append("SR")
            if rng.random() < 0.25:
                modalities.append("PR")
            for k, modality in enumerate(modalities):
                number = {"SR": 997, "PR": 9000 + k}.get(modality, k + 1)
                item = GenSeries(
                    len(series) + 1, f"{UID_ROOT}.2.{p}.{s + 1}.{k + 1}", study, modality,
                    number,
                )
                series.append(item)
                if p == target and s == 0 and k == 0:
                    target_series = item.id
    big = _spread_instances(rng, series, instances, target_series)
    return Archive(gen_patients, studies, series, big, target_series)


def _spread_instances(
    rng: random.Random, series: list[GenSeries], instances: int, target_series: int
) -> int:
    """Give every series its instance count so that the total is exactly ``instances``.

    SR/PR/CR/DX series hold one or two instances; ``BIG_SHARE`` of all instances go to series
    of ``BIG_SERIES`` CT/MR images (the target series is one); the rest are spread over the
    other CT/MR/US series, each at least one, with a long-tailed (log-normal) distribution.
    Returns the number of big series.
    """
    fixed = [s for s in series if s.modality in ("SR", "PR", "CR", "DX")]
    for s in fixed:
        s.instances = 1 if s.modality == "SR" else rng.choice((1, 1, 2))
    variable = [s for s in series if s.modality in ("CT", "MR", "US")]
    left = instances - sum(s.instances for s in fixed)
    big_count = int(BIG_SHARE * instances / BIG_SERIES)
    big_count = min(big_count, (left - len(variable)) // (BIG_SERIES - 1))
    if big_count < 1:
        raise BenchError(
            f"--instances {instances} is too few for this data model (no room for a "
            f"{BIG_SERIES}-image series); use at least 5,000"
        )
    by_id = {s.id: s for s in variable}
    others = [s for s in variable if s.id != target_series and s.modality in ("CT", "MR")]
    big = [by_id[target_series], *rng.sample(others, big_count - 1)]
    for s in big:
        s.instances = BIG_SERIES
    small = [s for s in variable if s.instances == 0]
    extra = left - BIG_SERIES * len(big) - len(small)  # beyond one instance per small series
    weights = [rng.lognormvariate(0.0, 1.2) for _ in small]
    total = sum(weights)
    for s, weight in zip(small, weights, strict=True):
        s.instances = 1 + min(BIG_SERIES - 2, int(extra * weight / total))
    short = instances - sum(s.instances for s in series)
    while short > 0:  # the rounding remainder, one by one to random small series
        s = rng.choice(small)
        if s.instances < BIG_SERIES - 1:
            s.instances += 1
            short -= 1
    if short < 0:
        raise AssertionError("instance counts overshoot")
    return len(big)


def instance_rows(data: Archive) -> Iterator[tuple[Any, ...]]:
    """Instance rows in ``INSTANCE_FIELDS`` order, series by series."""
    rng = random.Random(SEED + 1)
    charsets = {p.index: p.charset for p in data.patients}
    for s in data.series:
        modality = s.modality
        sop_class = _SOP_CLASS[modality]
        syntax = rng.choice(_TRANSFER_SYNTAX[modality])
        source = rng.choice(_SOURCE_AE[modality])
        address = f"10.20.{1 + s.study.patient % 7}.{10 + len(source)}"
        typical = _SIZE[modality]
        charset = charsets[s.study.patient]
        received = s.study.when + timedelta(minutes=5 + 3 * s.number % 60)
        prefix = f"{UID_ROOT}.3{s.uid[len(UID_ROOT) + 2:]}."
        for n in range(1, s.instances + 1):
            uid = f"{prefix}{n}"
            yield (
                uid,
                s.id,
                sop_class,
                n,
                charset,
                syntax,
                hashlib.sha256(uid.encode()).hexdigest(),
                typical + rng.randrange(-typical // 10, typical // 10 + 1),
                received + timedelta(milliseconds=40 * n),
                source,
                address,
            )


INSTANCE_FIELDS = [
    "sop_instance_uid", "series", "sop_class_uid", "instance_number", "specific_character_set",
    "transfer_syntax_uid", "digest", "size", "received_at", "source_ae", "source_address",
]


# --------------------------------------------------------------------------------------------
# filling the index


@dataclass
class FillInfo:
    storage: str
    reused: bool
    seconds: float | None
    patients: int
    studies: int
    series: int
    instances: int
    big_series: int
    db_bytes: int


def _import_node() -> None:
    """Make ``node`` importable when the script is run from anywhere."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def db_bytes(storage: Path) -> int:
    return sum(
        p.stat().st_size for p in storage.glob("index.sqlite*") if p.is_file()
    )


def table_counts(database: Path) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        return {
            table: int(db.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()[0])
            for table in ("patient", "study", "series", "instance")
        }


def cached_fill(storage: Path, instances: int) -> FillInfo | None:
    """The fill already in ``storage`` if it is this generator's, with ``instances`` rows."""
    database = storage / "index.sqlite"
    try:
        manifest = json.loads((storage / MANIFEST).read_text())
        if manifest.get("version") != GENERATOR_VERSION or manifest.get("instances") != instances:
            return None
        counts = table_counts(database)
    except (OSError, ValueError, sqlite3.Error):
        return None
    if counts["instance"] != instances:
        return None
    return FillInfo(str(storage), True, manifest.get("seconds"), counts["patient"],
                    counts["study"], counts["series"], counts["instance"],
                    int(manifest.get("big_series", 0)), db_bytes(storage))


def clear_storage(storage: Path) -> None:
    """Remove a previous fill; refuse a store that holds files (not a benchmark store)."""
    objects = storage / "objects"
    if objects.is_dir() and any(p.is_file() for p in objects.rglob("*")):
        raise BenchError(f"{storage} holds stored files: not a benchmark store, not touching it")
    (storage / MANIFEST).unlink(missing_ok=True)
    for path in storage.glob("index.sqlite*"):
        path.unlink()
    for sub in ("objects", "tmp"):
        shutil.rmtree(storage / sub, ignore_errors=True)


def fill(storage: Path, instances: int) -> FillInfo:
    """Create the store and index with the node's code and fill it in bulk."""
    _import_node()
    from peewee import chunked

    from node.config import build_config
    from node.index.models import Instance, Patient, Series, Study
    from node.index.writer import fold_name
    from node.services import open_services

    storage.mkdir(parents=True, exist_ok=True)
    clear_storage(storage)
    started = time.perf_counter()
    print(f"fill: generating {instances:,} instances ...", file=sys.stderr, flush=True)
    data = generate(instances)
    config = build_config({"storage": str(storage), "log_level": "warning"}, storage.parent)
    services = open_services(config)
    db = services.db
    try:
        # Benchmark data: nobody loses anything if the machine dies while filling.
        db.execute_sql("PRAGMA synchronous=OFF")  # type: ignore[no-untyped-call]
        # 512 MiB of page cache: the unique indexes (UIDs, digests) take random inserts
        db.execute_sql("PRAGMA cache_size=-524288")  # type: ignore[no-untyped-call]

        def insert(model: Any, fields: list[Any], rows: Sequence[tuple[Any, ...]]) -> None:
            per_statement = min(STATEMENT_ROWS, SQLITE_MAX_VARIABLES // len(fields))
            for chunk in chunked(rows, per_statement):
                model.insert_many(chunk, fields=fields).execute()

        with db.atomic():
            insert(
                Patient,
                [Patient.id, Patient.patient_id, Patient.patient_name,
                 Patient.patient_name_folded, Patient.patient_birth_date, Patient.patient_sex],
                [(p.index + 1, p.patient_id, p.name, fold_name(p.name), p.birth_date, p.sex)
                 for p in data.patients],
            )
            rng = random.Random(SEED + 2)
            rows = []
            for s in data.studies:
                physician = rng.choice(_PHYSICIANS)
                rows.append((
                    s.id, s.uid, s.patient + 1, s.date, s.time, f"ACC{s.id:08d}",
                    str(1 + s.id % 9999), s.kind.description, physician, fold_name(physician),
                    s.when + timedelta(minutes=5),
                ))
            insert(
                Study,
                [Study.id, Study.study_instance_uid, Study.patient, Study.study_date,
                 Study.study_time, Study.accession_number, Study.study_id,
                 Study.study_description, Study.referring_physician_name,
                 Study.referring_physician_name_folded, Study.received_at],
                rows,
            )
            insert(
                Series,
                [Series.id, Series.series_instance_uid, Series.study, Series.modality,
                 Series.series_number, Series.series_date, Series.series_time,
                 Series.series_description, Series.body_part_examined],
                [(s.id, s.uid, s.study.id, s.modality, s.number, s.study.date, s.study.time,
                  _SERIES_DESCRIPTION[s.modality][s.number % len(_SERIES_DESCRIPTION[s.modality])],
                  s.study.kind.body_part)
                 for s in data.series],
            )
        fields = [getattr(Instance, name) for name in INSTANCE_FIELDS]
        done = 0
        for batch in chunked(instance_rows(data), TRANSACTION_ROWS):
            with db.atomic():
                insert(Instance, fields, batch)
            done += len(batch)
            if done % 200_000 < TRANSACTION_ROWS or done == instances:
                rate = done / (time.perf_counter() - started)
                print(f"fill: {done:,} instances ({rate:,.0f}/s)", file=sys.stderr, flush=True)
        db.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)")  # type: ignore[no-untyped-call]
    finally:
        services.close()
    seconds = time.perf_counter() - started
    counts = table_counts(storage / "index.sqlite")
    if counts["instance"] != instances:
        raise BenchError(f"fill: {counts['instance']} instance rows, expected {instances}")
    (storage / MANIFEST).write_text(json.dumps({
        "version": GENERATOR_VERSION, "instances": instances, "seconds": round(seconds, 1),
        "big_series": data.big_series, **counts,
    }, indent=2) + "\n")
    return FillInfo(str(storage), False, round(seconds, 1), counts["patient"], counts["study"],
                    counts["series"], counts["instance"], data.big_series, db_bytes(storage))


# --------------------------------------------------------------------------------------------
# queries and their expected answers (computed from the SQLite file, not through the node)

Value = str | int | tuple[str, ...]


@dataclass
class Query:
    name: str
    model: str  # "patient" or "study" root
    level: str
    keys: dict[str, str]  # matching keys with their values; return keys with ""
    unique: str  # the key that identifies one answer
    expected: dict[str, dict[str, Value]] = field(default_factory=dict)  # unique -> key -> value
    note: str = ""  # what the expected answers mean (shown when the count is wrong)


def _one(db: sqlite3.Connection, sql: str, *params: object) -> Any:
    row = db.execute(sql, params).fetchone()
    if row is None:
        raise BenchError(f"the index has no row for: {sql} {params}")
    return row[0] if len(row) == 1 else row


def build_queries(database: Path, patients: int) -> list[Query]:
    """The six queries with concrete values taken from the index, and what they must return."""
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        patient_id = f"PID{target_patient_index(patients):07d}"
        patient_pk = _one(db, "SELECT id FROM patient WHERE patient_id = ?", patient_id)
        queries: list[Query] = []

        # 1. studies of one patient
        by_id = Query(
            "study by PatientID", "study", "STUDY",
            {"PatientID": patient_id, "StudyInstanceUID": "", "StudyDate": "",
             "StudyDescription": "", "ModalitiesInStudy": "", "NumberOfStudyRelatedInstances": ""},
            "StudyInstanceUID",
        )
        for uid, day, description, pk in db.execute(
            "SELECT study_instance_uid, study_date, study_description, id FROM study"
            " WHERE patient_id = ?", (patient_pk,)
        ):
            modalities = tuple(sorted(m for (m,) in db.execute(
                "SELECT DISTINCT modality FROM series WHERE study_id = ?", (pk,))))
            count = _one(db, "SELECT COUNT(*) FROM instance i JOIN series s ON s.id = i.series_id"
                             " WHERE s.study_id = ?", pk)
            by_id.expected[uid] = {"StudyDate": day, "StudyDescription": description,
                                   "ModalitiesInStudy": modalities,
                                   "NumberOfStudyRelatedInstances": count}
        queries.append(by_id)

        # 2. PatientName prefix wildcard, case-insensitive (the node's default)
        folded = NAME_PREFIX.casefold()
        by_name = Query(
            f"study by PatientName {NAME_PREFIX}*", "study", "STUDY",
            {"SpecificCharacterSet": "ISO_IR 192", "PatientName": f"{NAME_PREFIX}*",
             "StudyInstanceUID": "", "PatientID": "", "StudyDate": ""},
            "StudyInstanceUID",
        )
        for uid, name, pid, day in db.execute(
            "SELECT st.study_instance_uid, p.patient_name, p.patient_id, st.study_date"
            " FROM study st JOIN patient p ON p.id = st.patient_id"
            " WHERE substr(p.patient_name_folded, 1, ?) = ?", (len(folded), folded)
        ):
            by_name.expected[uid] = {"PatientName": name, "PatientID": pid, "StudyDate": day}
        exact = _one(db, "SELECT COUNT(*) FROM study st JOIN patient p ON p.id = st.patient_id"
                         " WHERE p.patient_name GLOB ?", f"{NAME_PREFIX}*")
        by_name.note = (f"{len(by_name.expected)} studies match case-insensitively, {exact} "
                        "case-sensitively")
        queries.append(by_name)

        # 2b. a selective name search: the target patient's family name and given initial
        name = str(_one(db, "SELECT patient_name FROM patient WHERE id = ?", patient_pk))
        family, _, given = name.partition("^")
        prefix = f"{family}^{given[:1]}"
        by_initial = Query(
            f"study by PatientName {prefix}*", "study", "STUDY",
            {"SpecificCharacterSet": "ISO_IR 192", "PatientName": f"{prefix}*",
             "StudyInstanceUID": "", "PatientID": "", "StudyDate": ""},
            "StudyInstanceUID",
        )
        for uid, pname, pid, day in db.execute(
            "SELECT st.study_instance_uid, p.patient_name, p.patient_id, st.study_date"
            " FROM study st JOIN patient p ON p.id = st.patient_id"
            " WHERE substr(p.patient_name_folded, 1, ?) = ?",
            (len(prefix.casefold()), prefix.casefold())
        ):
            by_initial.expected[uid] = {"PatientName": pname, "PatientID": pid,
                                        "StudyDate": day}
        queries.append(by_initial)

        # 3a. one day of studies (a worklist-style "today")
        first, last = DATE_RANGE
        one_day = Query(
            f"study by StudyDate {first}", "study", "STUDY",
            {"StudyDate": first, "StudyInstanceUID": "", "PatientID": "", "StudyTime": ""},
            "StudyInstanceUID",
        )
        for uid, day, moment, pid in db.execute(
            "SELECT st.study_instance_uid, st.study_date, st.study_time, p.patient_id"
            " FROM study st JOIN patient p ON p.id = st.patient_id WHERE st.study_date = ?",
            (first,)
        ):
            one_day.expected[uid] = {"StudyDate": day, "StudyTime": moment, "PatientID": pid}
        queries.append(one_day)

        # 3. a month of studies
        first, last = DATE_RANGE
        by_date = Query(
            f"study by StudyDate {first}-{last}", "study", "STUDY",
            {"StudyDate": f"{first}-{last}", "StudyInstanceUID": "", "PatientID": "",
             "StudyTime": ""},
            "StudyInstanceUID",
        )
        for uid, day, moment, pid in db.execute(
            "SELECT st.study_instance_uid, st.study_date, st.study_time, p.patient_id"
            " FROM study st JOIN patient p ON p.id = st.patient_id"
            " WHERE st.study_date BETWEEN ? AND ?", (first, last)
        ):
            by_date.expected[uid] = {"StudyDate": day, "StudyTime": moment, "PatientID": pid}
        queries.append(by_date)

        # 4. every patient
        everyone = Query(
            "all patients (PatientID universal)", "patient", "PATIENT",
            {"PatientID": "", "PatientName": "", "PatientBirthDate": "", "PatientSex": ""},
            "PatientID",
        )
        for pid, name, birth, sex in db.execute(
            "SELECT patient_id, patient_name, patient_birth_date, patient_sex FROM patient"
        ):
            everyone.expected[pid] = {"PatientName": name, "PatientBirthDate": birth,
                                      "PatientSex": sex}
        queries.append(everyone)

        # 5. series of the patient's first study, 6. images of its 500-image series
        study_pk, study_uid = _one(
            db, "SELECT id, study_instance_uid FROM study WHERE patient_id = ? ORDER BY id"
                " LIMIT 1", patient_pk)
        series_query = Query(
            "series of a study", "study", "SERIES",
            {"StudyInstanceUID": study_uid, "SeriesInstanceUID": "", "Modality": "",
             "SeriesNumber": "", "NumberOfSeriesRelatedInstances": ""},
            "SeriesInstanceUID",
        )
        big_uid = None
        for uid, modality, number, count in db.execute(
            "SELECT s.series_instance_uid, s.modality, s.series_number, COUNT(i.id)"
            " FROM series s JOIN instance i ON i.series_id = s.id WHERE s.study_id = ?"
            " GROUP BY s.id ORDER BY s.id", (study_pk,)
        ):
            series_query.expected[uid] = {"Modality": modality, "SeriesNumber": number,
                                          "NumberOfSeriesRelatedInstances": count}
            if count == BIG_SERIES and big_uid is None:
                big_uid = uid
        queries.append(series_query)
        if big_uid is None:
            raise BenchError(f"no {BIG_SERIES}-image series in study {study_uid}")

        images = Query(
            f"images of a {BIG_SERIES}-image series", "study", "IMAGE",
            {"StudyInstanceUID": study_uid, "SeriesInstanceUID": big_uid, "SOPInstanceUID": "",
             "InstanceNumber": ""},
            "SOPInstanceUID",
        )
        for uid, number in db.execute(
            "SELECT i.sop_instance_uid, i.instance_number FROM instance i"
            " JOIN series s ON s.id = i.series_id WHERE s.series_instance_uid = ?", (big_uid,)
        ):
            images.expected[uid] = {"InstanceNumber": number}
        queries.append(images)
    return queries


def identifier(query: Query) -> Any:
    from pydicom.dataset import Dataset as PydicomDataset

    ds = PydicomDataset()
    ds.QueryRetrieveLevel = query.level
    for keyword, value in query.keys.items():
        setattr(ds, keyword, value)
    return ds


def _normalise(value: Any) -> Value:
    """A response element's value in the form the expected answers use."""
    from pydicom.multival import MultiValue

    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return tuple(sorted(str(v) for v in value))
    if isinstance(value, int):  # IS is an int subclass
        return int(value)
    return str(value)


def check_answers(query: Query, answers: Sequence[Any]) -> list[str]:
    """What is wrong with the node's answers to ``query``, one line per kind of problem."""
    problems: list[str] = []
    returned = [k for k in query.keys if k != "SpecificCharacterSet"]
    missing: dict[str, int] = {}
    wrong: dict[str, list[str]] = {}
    seen: dict[str, int] = {}
    for ds in answers:
        for keyword in ["QueryRetrieveLevel", *returned]:
            if keyword not in ds:
                missing[keyword] = missing.get(keyword, 0) + 1
        if "QueryRetrieveLevel" in ds and ds.QueryRetrieveLevel != query.level:
            wrong.setdefault("QueryRetrieveLevel", []).append(str(ds.QueryRetrieveLevel))
        key = str(ds.get(query.unique, ""))
        seen[key] = seen.get(key, 0) + 1
        expected = query.expected.get(key)
        if expected is None:
            continue
        for keyword, value in expected.items():
            got = _normalise(ds[keyword].value) if keyword in ds else None
            if isinstance(value, tuple) and isinstance(got, str):
                got = (got,)  # a multi-valued key answered with one value
            if keyword in ds and got != value:
                wrong.setdefault(keyword, []).append(f"{key}: {got!r} (expected {value!r})")
    if len(answers) != len(query.expected):
        problems.append(f"{len(answers)} answers, expected {len(query.expected)}"
                        + (f" ({query.note})" if query.note else ""))
    unexpected = [k for k in seen if k not in query.expected]
    if unexpected:
        problems.append(f"{len(unexpected)} answers that should not match, e.g. "
                        f"{query.unique}={unexpected[0]!r}")
    absent = [k for k in query.expected if k not in seen]
    if absent:
        problems.append(f"{len(absent)} expected answers missing, e.g. "
                        f"{query.unique}={absent[0]!r}")
    doubled = [k for k, n in seen.items() if n > 1]
    if doubled:
        problems.append(f"{len(doubled)} answers repeated, e.g. {query.unique}={doubled[0]!r}")
    for keyword, count in missing.items():
        problems.append(f"{keyword} missing in {count} of {len(answers)} answers")
    for keyword, cases in wrong.items():
        problems.append(f"{keyword} wrong in {len(cases)} answers, e.g. {cases[0]}")
    return problems


# --------------------------------------------------------------------------------------------
# the node


class Node(NodeServer):
    """``python -m node serve`` on the filled store, ready when a pynetdicom C-ECHO succeeds."""

    poll_interval = 0.05
    log_mode = "wb"

    def __init__(self, storage: Path, workdir: Path, python: str, ready_timeout: float) -> None:
        # INFO: the node logs one line per C-FIND with its own time (request to final response).
        super().__init__(workdir, ready_timeout, python=python, storage=storage,
                         log_level="info")
        self.log_path = workdir / "node.log"

    def ready(self) -> bool:
        return echo_once(self.port)


def _scu(dimse_timeout: float = 30.0) -> Any:
    from pynetdicom import AE
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        PatientRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelFind,
        Verification,
    )

    ae = AE(ae_title=SCU_AET)
    ae.add_requested_context(Verification)
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.acse_timeout = 10
    ae.connection_timeout = 5
    ae.dimse_timeout = dimse_timeout
    ae.network_timeout = 600
    return ae


def echo_once(port: int) -> bool:
    """One association with one C-ECHO; True on Success."""
    assoc = _scu(5.0).associate(HOST, port, ae_title=NODE_AET)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status and status.Status == 0x0000)
    finally:
        assoc.release()


# --------------------------------------------------------------------------------------------
# measuring


@dataclass
class QueryResult:
    name: str
    level: str
    matches: int | None = None
    expected: int | None = None
    first_ms: float | None = None
    samples_ms: list[float] = field(default_factory=list)
    node_own_ms: list[float] = field(default_factory=list)  # the node's log: request to final
    node_cpu_ms: float | None = None  # per timed run: CPU the node process used
    scu_cpu_ms: float | None = None  # per timed run: CPU this process (the SCU) used
    problems: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.samples_ms) if self.samples_ms else None

    @property
    def p95_ms(self) -> float | None:
        return percentile(self.samples_ms, 0.95)


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


class FindFailed(Exception):
    pass


def run_find(assoc: Any, query: Query, model: Any) -> list[Any]:
    """One C-FIND; the pending identifiers, or FindFailed with the status.

    The requestor's reactor is paused around the exchange, as in the node's own client: else
    pynetdicom may drop a response on a busy machine (its issue #875, node.scu.send).
    """
    _import_node()
    from node.scu.send import paused_while

    answers: list[Any] = []
    for status, ds in paused_while(assoc, lambda: assoc.send_c_find(identifier(query), model)):
        if not status or "Status" not in status:
            raise FindFailed("no response (association aborted or DIMSE timeout)")
        code = int(status.Status)
        if code in PENDING:
            answers.append(ds)
            continue
        if code != 0x0000:
            comment = status.get("ErrorComment", "")
            raise FindFailed(f"status 0x{code:04X}" + (f": {comment}" if comment else ""))
        return answers
    raise FindFailed("the response stream ended without a final status")


_OWN_TIME = re.compile(r"INFO node\.handlers\.find: C-FIND .* ([0-9.]+) ms$")


def own_times(log: Path, skip: int) -> tuple[list[float], int]:
    """The node's own time of each C-FIND logged after the first ``skip`` ones, and the count."""
    times = [float(m[1]) for line in log.read_text(errors="replace").splitlines()
             if (m := _OWN_TIME.search(line))]
    return times[skip:], len(times)


def measure(
    port: int, node_pid: int, queries: Sequence[Query], repeat: int, node_log: Path
) -> tuple[list[float], list[QueryResult]]:
    """Echo round trips and every query on one association."""
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        PatientRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelFind,
    )

    models = {
        "patient": PatientRootQueryRetrieveInformationModelFind,
        "study": StudyRootQueryRetrieveInformationModelFind,
    }
    assoc = _scu(dimse_timeout=300.0).associate(HOST, port, ae_title=NODE_AET)
    if not assoc.is_established:
        raise BenchError(f"cannot open an association with {NODE_AET} on {HOST}:{port}")
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        lacking = [m.name for m in models.values() if m not in accepted]
        if lacking:
            raise BenchError(f"C-FIND not supported by the node (rejected: {', '.join(lacking)})")
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # pynetdicom's DUL sleeps 1 ms whenever it finds nothing to do; a real SCU does not.
        assoc.dul._run_loop_delay = SCU_POLL

        echoes: list[float] = []
        for _ in range(repeat + 1):
            started = time.perf_counter()
            status = assoc.send_c_echo()
            elapsed = (time.perf_counter() - started) * 1000
            if not status or status.Status != 0x0000:
                raise BenchError(f"C-ECHO failed on the measuring association: {status}")
            echoes.append(elapsed)
        echoes = echoes[1:]  # the first one warms up

        results: list[QueryResult] = []
        for query in queries:
            result = QueryResult(query.name, query.level, expected=len(query.expected))
            results.append(result)
            print(f"query: {query.name} ...", file=sys.stderr, end="", flush=True)
            try:
                started = time.perf_counter()
                answers = run_find(assoc, query, models[query.model])
                result.first_ms = (time.perf_counter() - started) * 1000
                result.matches = len(answers)
                result.problems = check_answers(query, answers)
                del answers
                _, logged = own_times(node_log, 0)
                node0, scu0 = process_cpu_seconds(node_pid), time.process_time()
                for _ in range(repeat):
                    started = time.perf_counter()
                    count = len(run_find(assoc, query, models[query.model]))
                    result.samples_ms.append((time.perf_counter() - started) * 1000)
                    if count != result.matches:
                        result.problems.append(f"{count} answers on a repeat, "
                                               f"{result.matches} the first time")
                node1, scu1 = process_cpu_seconds(node_pid), time.process_time()
                result.node_own_ms, _ = own_times(node_log, logged)
                result.scu_cpu_ms = (scu1 - scu0) * 1000 / repeat
                if node0 is not None and node1 is not None:
                    result.node_cpu_ms = (node1 - node0) * 1000 / repeat
            except FindFailed as exc:
                result.error = str(exc)
            print(" " + _progress(result), file=sys.stderr, flush=True)
            if not assoc.is_established:
                result.error = (result.error or "") + " (association lost)"
                break
        return echoes, results
    finally:
        if assoc.is_established:
            assoc.release()


def _progress(result: QueryResult) -> str:
    if result.error:
        return f"FAILED: {result.error}"
    text = f"{result.matches} matches, median {_ms(result.median_ms)} ms"
    return text + (" (answers wrong)" if result.problems else "")


# --------------------------------------------------------------------------------------------
# report


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"nproc": nproc(), "cpu": cpu_model(), "kernel": kernel(),
                            "python": python_version(),
                            "sqlite": sqlite3.sqlite_version}
    with contextlib.suppress(ImportError):
        import pydicom
        import pynetdicom

        info["pynetdicom"] = pynetdicom.__version__
        info["pydicom"] = pydicom.__version__
    return info


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}" if value < 100 else f"{value:,.0f}"


def table(results: Sequence[QueryResult], echo_ms: float | None) -> str:
    header = ("query", "level", "matches", "node own ms", "node CPU ms", "first ms",
              "median ms", "p95 ms", "beyond echo ms", "answers/s", "SCU CPU ms")
    rows: list[tuple[str, ...]] = [header]
    for r in results:
        beyond = None if r.median_ms is None or echo_ms is None else r.median_ms - echo_ms
        rate = (f"{r.matches / (r.median_ms / 1000):,.0f}"
                if r.matches and r.median_ms else "-")
        matches = "FAIL" if r.error else f"{r.matches:,}" + ("" if not r.problems else " !")
        own = statistics.median(r.node_own_ms) if r.node_own_ms else None
        rows.append((r.name, r.level, matches, _ms(own), _ms(r.node_cpu_ms), _ms(r.first_ms),
                     _ms(r.median_ms), _ms(r.p95_ms), _ms(beyond), rate, _ms(r.scu_cpu_ms)))
    return render_table(rows, left=2)


# --------------------------------------------------------------------------------------------
# main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Fill a large node index in bulk, start the node on it and time C-FIND "
        "queries over one association.",
        epilog="The filled store is cached (see --db) and reused when it matches.",
    )
    parser.add_argument("--instances", type=int, default=1_000_000, metavar="N",
                        help="instances in the index (default: %(default)s)")
    parser.add_argument("--db", type=Path, metavar="PATH",
                        help="storage directory to fill or reuse "
                        "(default: /tmp/dicomnode-find-bench/N/storage)")
    parser.add_argument("--repeat", type=int, default=20, metavar="R",
                        help="timed runs of each query, after one warm-up (default: %(default)s)")
    parser.add_argument("--refill", action="store_true",
                        help="fill again even when a matching cached store exists")
    parser.add_argument("--fill-only", action="store_true",
                        help="fill (or reuse) the index, then stop")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also save results as JSON")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter that runs `-m node serve` (default: %(default)s)")
    parser.add_argument("--ready-timeout", type=float, default=120.0, metavar="S",
                        help="seconds the node has to answer C-ECHO (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.instances < 5000:
        parser.error("--instances must be at least 5000")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.db is None:
        args.db = Path(f"/tmp/dicomnode-find-bench/{args.instances}/storage")
    args.db = args.db.resolve()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine_info()
    with interrupts_stop_children():
        try:
            return _run(args, info)
        except KeyboardInterrupt:
            print("\ninterrupted; node stopped", file=sys.stderr)
            return 130
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1


def _run(args: argparse.Namespace, info: dict[str, Any]) -> int:
    filled = None if args.refill else cached_fill(args.db, args.instances)
    if filled is not None:
        print(f"fill: reusing {args.db} ({filled.instances:,} instances)", file=sys.stderr)
    else:
        filled = fill(args.db, args.instances)
        print(f"fill: {filled.instances:,} instances in {filled.seconds:.1f} s, "
              f"{filled.db_bytes / 1e6:,.0f} MB", file=sys.stderr)
    if args.fill_only:
        return 0
    queries = build_queries(args.db / "index.sqlite", filled.patients)
    node = Node(args.db, args.db.parent, args.python, args.ready_timeout)
    try:
        started = time.perf_counter()
        node.start()
        ready_s = time.perf_counter() - started
        assert node.proc is not None
        echoes, results = measure(node.port, node.proc.pid, queries, args.repeat, node.log_path)
        if not node.alive():
            raise BenchError(f"the node died during the queries\n{node.log_tail()}")
    finally:
        node.stop()
    echo_ms = statistics.median(echoes)

    fill_note = ("reused; " if filled.reused else "") + (
        f"filled in {filled.seconds:.0f} s" if filled.seconds is not None else "")
    print(f"# C-FIND benchmark  nproc={info['nproc']}  cpu={info['cpu']}  "
          f"python={info['python']}  sqlite={info['sqlite']}  "
          f"pynetdicom={info.get('pynetdicom')}")
    print(f"# index: {filled.instances:,} instances, {filled.series:,} series, "
          f"{filled.studies:,} studies, {filled.patients:,} patients; "
          f"{filled.big_series:,} series of {BIG_SERIES}; db {filled.db_bytes / 1e6:,.0f} MB "
          f"({fill_note}); {args.db}")
    print(f"# node answered C-ECHO {ready_s:.2f} s after start; one association, "
          f"Nagle off, SCU poll {SCU_POLL * 1000:g} ms; 1 warm-up + {args.repeat} timed runs "
          "per query")
    print("# node/SCU CPU ms: CPU time per timed run of the node process and of this one "
          "(SCU, incl. its DUL thread polling)")
    print(f"# C-ECHO round trip: median {_ms(echo_ms)} ms, p95 {_ms(percentile(echoes, 0.95))} ms")
    print(table(results, echo_ms))
    failed = False
    for r in results:
        if r.error:
            failed = True
            print(f"! {r.name}: {r.error}")
        for problem in r.problems:
            failed = True
            print(f"! {r.name}: {problem}")
    if len(results) < len(queries):
        failed = True
        print(f"! only {len(results)} of {len(queries)} queries ran")

    if args.json:
        payload = {
            "machine": info,
            "fill": asdict(filled),
            "repeat": args.repeat,
            "echo_ms": {"median": echo_ms, "p95": percentile(echoes, 0.95), "samples": echoes},
            "queries": [
                {**asdict(r), "median_ms": r.median_ms, "p95_ms": r.p95_ms,
                 "beyond_echo_ms": None if r.median_ms is None else r.median_ms - echo_ms,
                 "keys": q.keys}
                for r, q in zip(results, queries, strict=False)
            ],
            "ok": not failed,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

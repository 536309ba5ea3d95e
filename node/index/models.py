"""The four-level index tables (PS3.4 C.6.1.1 / C.6.2.1): fields, keys and indexes only.

The schema uses only types both SQLite and PostgreSQL have, so it runs unchanged on either.
Text is stored decoded (Unicode); DA/TM values keep their DICOM string form so that ranges
compare as strings.  ``*_folded`` columns hold case-folded person names for matching.
"""

from __future__ import annotations

from peewee import (
    AutoField,
    BigAutoField,
    BigIntegerField,
    CharField,
    DateTimeField,
    ForeignKeyField,
    IntegerField,
    Model,
    TextField,
)

SCHEMA_VERSION = 2  # 2: retrieve_lease

UID_LENGTH = 64  # PS3.5 9.1
DIGEST_LENGTH = 64  # SHA-256, hex


class BaseModel(Model):
    """Tables are bound to a database at run time by ``node.index.database``."""

    id = AutoField()


class SchemaInfo(BaseModel):
    """One row: the schema version this database was created or migrated to."""

    version = IntegerField()

    class Meta:
        table_name = "schema_info"


class Patient(BaseModel):
    """PATIENT level: keyed by Patient ID and its issuer (PS3.4 C.6.1.1.2)."""

    patient_id = TextField(default="")
    issuer_of_patient_id = TextField(default="")
    patient_name = TextField(default="")
    patient_name_folded = TextField(default="", index=True)
    patient_birth_date = TextField(default="")
    patient_sex = TextField(default="")

    class Meta:
        table_name = "patient"
        indexes = ((("patient_id", "issuer_of_patient_id"), True),)


class Study(BaseModel):
    """STUDY level (PS3.4 C.6.1.1.3)."""

    study_instance_uid = CharField(max_length=UID_LENGTH, unique=True)
    patient = ForeignKeyField(Patient, backref="studies", on_delete="CASCADE", index=True)
    study_date = TextField(default="", index=True)
    study_time = TextField(default="")
    accession_number = TextField(default="", index=True)
    study_id = TextField(default="")
    study_description = TextField(default="")
    referring_physician_name = TextField(default="")
    referring_physician_name_folded = TextField(default="")
    received_at = DateTimeField(index=True)  # first instance; retention goes oldest first

    class Meta:
        table_name = "study"


class Series(BaseModel):
    """SERIES level (PS3.4 C.6.1.1.4)."""

    series_instance_uid = CharField(max_length=UID_LENGTH, unique=True)
    study = ForeignKeyField(Study, backref="series", on_delete="CASCADE", index=True)
    modality = TextField(default="", index=True)
    series_number = IntegerField(null=True)
    series_date = TextField(default="")
    series_time = TextField(default="")
    series_description = TextField(default="")
    body_part_examined = TextField(default="")

    class Meta:
        table_name = "series"


class Instance(BaseModel):
    """IMAGE level (PS3.4 C.6.1.1.5) plus where and how the file is kept."""

    id = BigAutoField()  # an archive can outgrow 2**31 instances

    sop_instance_uid = CharField(max_length=UID_LENGTH, unique=True)
    series = ForeignKeyField(Series, backref="instances", on_delete="CASCADE", index=True)
    sop_class_uid = CharField(max_length=UID_LENGTH, index=True)
    instance_number = IntegerField(null=True)
    specific_character_set = TextField(default="")
    transfer_syntax_uid = CharField(max_length=UID_LENGTH)
    digest = CharField(max_length=DIGEST_LENGTH, unique=True)
    size = BigIntegerField()
    received_at = DateTimeField(index=True)
    source_ae = TextField(default="")
    source_address = TextField(default="")

    class Meta:
        table_name = "instance"


class RetrieveLease(BaseModel):
    """A study being sent by a C-MOVE or C-GET: deletion and retention leave it alone.

    Rows live in the database, not in a process, so that ``dicom-node delete`` and a second
    node see the retrieves of every node.  A lease ends when its retrieve does; one left by a
    crash ends at ``expires_at``.
    """

    study = ForeignKeyField(Study, on_delete="CASCADE", index=True)
    holder = TextField()  # host:pid of the retrieving process, for the administrator
    expires_at = DateTimeField(index=True)

    class Meta:
        table_name = "retrieve_lease"


TABLES: list[type[BaseModel]] = [SchemaInfo, Patient, Study, Series, Instance, RetrieveLease]

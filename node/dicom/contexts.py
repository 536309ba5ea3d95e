"""Which SOP classes and transfer syntaxes the node accepts, as pynetdicom presentation contexts."""

from __future__ import annotations

from pydicom import uid
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

# Stored exactly as received (no transcoding), so every transfer syntax whose byte layout of
# the dataset header pydicom can read is fine: the list plus the newer compressions.
STORAGE_TRANSFER_SYNTAXES: list[str] = [
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.JPEG2000MCLossless,
    uid.JPEG2000MC,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.HTJ2K,
    uid.RLELossless,
    uid.MPEG2MPML,
    uid.MPEG2MPHL,
    uid.MPEG4HP41,
    uid.MPEG4HP41BD,
    uid.HEVCMP51,
    uid.HEVCM10P51,
]


def storage_contexts() -> list[PresentationContext]:
    """Every storage SOP class pynetdicom knows, each with every accepted transfer syntax."""
    return [
        build_context(cx.abstract_syntax, STORAGE_TRANSFER_SYNTAXES)  # type: ignore[arg-type]
        for cx in AllStoragePresentationContexts
    ]


def query_contexts() -> list[PresentationContext]:
    """C-FIND in the Patient Root and Study Root information models (PS3.4 C.6.1, C.6.2)."""
    syntaxes: list[str] = [
        uid.ImplicitVRLittleEndian, uid.ExplicitVRLittleEndian, uid.ExplicitVRBigEndian
    ]
    return [
        build_context(PatientRootQueryRetrieveInformationModelFind, syntaxes),
        build_context(StudyRootQueryRetrieveInformationModelFind, syntaxes),
    ]


def verification_contexts() -> list[PresentationContext]:
    """C-ECHO (PS3.4 A.4), in the two uncompressed little endian syntaxes and big endian."""
    return [
        build_context(
            Verification,
            [uid.ImplicitVRLittleEndian, uid.ExplicitVRLittleEndian, uid.ExplicitVRBigEndian],
        )
    ]

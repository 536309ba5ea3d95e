"""Which SOP classes and transfer syntaxes the node accepts, as pynetdicom presentation contexts."""

from __future__ import annotations

from pydicom import uid
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
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


# The syntaxes every DICOM AE understands (PS3.5 10.1: Implicit VR Little Endian is the default)
# and the one the node prefers; a stored instance can always be re-encoded in either when its
# stored syntax is not accepted (node.retrieve.stored).
UNCOMPRESSED_TRANSFER_SYNTAXES: list[str] = [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian]


def storage_contexts() -> list[PresentationContext]:
    """Every storage SOP class pynetdicom knows, each with every accepted transfer syntax.

    Both roles are offered for SCP/SCU Role Selection (PS3.7 D.3.3.4): a C-GET requester
    proposes the SCP role for storage so the node can send it instances on the same
    association (PS3.4 C.4.3); pynetdicom's acceptor table (presentation.SCP_SCU_ROLES) then
    grants the inverted roles, and keeps the default roles (the peer stores, the node is SCP)
    when no role selection is proposed, so C-STORE to the node is unchanged. The roles must be
    passed on with ``add_supported_context``: ``AE.supported_contexts`` drops them.
    """
    contexts = []
    for cx in AllStoragePresentationContexts:
        context = build_context(cx.abstract_syntax, STORAGE_TRANSFER_SYNTAXES)  # type: ignore[arg-type]
        context.scu_role = True
        context.scp_role = True
        contexts.append(context)
    return contexts


def retrieve_contexts() -> list[PresentationContext]:
    """C-MOVE and C-GET in the Patient Root and Study Root models (PS3.4 C.6.1, C.6.2)."""
    syntaxes: list[str] = [
        uid.ImplicitVRLittleEndian, uid.ExplicitVRLittleEndian, uid.ExplicitVRBigEndian
    ]
    return [
        build_context(model, syntaxes)
        for model in (
            PatientRootQueryRetrieveInformationModelMove,
            StudyRootQueryRetrieveInformationModelMove,
            PatientRootQueryRetrieveInformationModelGet,
            StudyRootQueryRetrieveInformationModelGet,
        )
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

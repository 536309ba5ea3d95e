"""DICOM TLS (PS3.15 B.9-B.12): the node's SSL contexts, and the handshake with a time limit.

``server_context`` is the TLS listener's: the node's certificate and key, client certificates
verified against ``tls.ca`` (required with ``require_client_certificate``).  ``client_context``
is for calling peers configured with ``tls: true``: it verifies the peer against ``tls.ca``
(the system store without one) and presents the node's own certificate.  Both refuse anything
older than TLS 1.2 (BCP 195, which PS3.15 B.9 profiles); cipher suites are OpenSSL's defaults
as Python restricts them (forward-secret AES-GCM/ChaCha20/AES suites, no RC4, 3DES or SHA-1 MACs).

Neither context does its handshake while a socket is wrapped: the listener would wait in its
accepting thread for a client that never speaks, and a caller could not tell a refused
certificate from a refused connection.  ``handshake`` does it, bounded in time, in the
association's own thread, and raises HandshakeFailed naming what went wrong.

Files are checked when a context is built: a missing or unreadable file, a file without the
expected PEM content, an encrypted key or a key that does not belong to the certificate stops
the node with one line naming the file (StartupError).
"""

from __future__ import annotations

import logging
import socket
import ssl
from pathlib import Path

from node.config import TlsSettings
from node.errors import NodeError, StartupError

log = logging.getLogger(__name__)

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2  # PS3.15 B.9 (BCP 195): TLS 1.2 or newer


class HandshakeFailed(NodeError):
    """The TLS handshake did not complete: certificate refused, not TLS, closed or too slow."""


class _EncryptedKey(Exception):
    """Raised from load_cert_chain's password callback: OpenSSL would otherwise prompt."""


class _DeferredHandshake(ssl.SSLContext):
    """A context whose sockets do their handshake when ``handshake`` asks, not on connect.

    pynetdicom wraps the socket itself (``AssociationSocket.connect``, ``get_request``) and
    would handshake without a time limit and report a failure only as a failed connection.
    Should nobody call ``handshake``, OpenSSL does it on the first read or write.
    """

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        return super().wrap_socket(sock, server_side, False, suppress_ragged_eofs,
                                   server_hostname, session)


def server_context(settings: TlsSettings) -> ssl.SSLContext:
    """The TLS listener's context (raises StartupError on a bad file)."""
    context = _DeferredHandshake(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    _load_identity(context, settings)
    if settings.ca is None:
        context.verify_mode = ssl.CERT_NONE  # no CA to verify them against: not asked for
    else:
        _load_ca(context, settings.ca)
        # PS3.15 B.9: the node may require the peer's certificate; CERT_OPTIONAL asks for it
        # and refuses one that does not verify, but lets a client without one in.
        context.verify_mode = (ssl.CERT_REQUIRED if settings.require_client_certificate
                               else ssl.CERT_OPTIONAL)
    return context


def client_context(settings: TlsSettings) -> ssl.SSLContext:
    """The context for calling peers over TLS (raises StartupError on a bad file).

    The peer's certificate is always verified (CERT_REQUIRED) and the node presents its own.
    Whether the peer's host must also match its certificate depends on what it is verified
    against:

    - with ``tls.ca`` (a private DICOM CA, the usual set-up) the host is not checked: peers are
      often configured by IP address, and devices' certificates often carry neither their
      name nor their address; whatever that CA certified is trusted, as the listener trusts
      the clients it certified.
    - without ``tls.ca`` (the system's public CAs) the host is checked, name or IP address
      against the certificate's subjectAltName: otherwise any publicly trusted certificate,
      anybody's web server's, would pass for the peer.
    """
    context = _DeferredHandshake(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    context.minimum_version = MINIMUM_VERSION
    _load_identity(context, settings)
    if settings.ca is None:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        context.check_hostname = False
        _load_ca(context, settings.ca)
    return context


def handshake(sock: ssl.SSLSocket, timeout: float | None) -> None:
    """Do the TLS handshake on ``sock``, waiting at most ``timeout`` seconds for the peer.

    Raises HandshakeFailed with the reason (certificate not trusted, not TLS, ...).
    """
    previous = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        sock.do_handshake()
    except ssl.SSLCertVerificationError as exc:
        raise HandshakeFailed(f"certificate refused: {exc.verify_message}") from exc
    except ssl.SSLError as exc:
        raise HandshakeFailed(_describe(exc)) from exc
    except TimeoutError as exc:
        raise HandshakeFailed(f"no TLS handshake within {timeout:g} s") from exc
    except OSError as exc:  # reset or closed by the peer mid-handshake
        raise HandshakeFailed(f"connection lost during the TLS handshake: "
                              f"{exc.strerror or exc}") from exc
    finally:
        sock.settimeout(previous)
    if log.isEnabledFor(logging.DEBUG):
        cipher = sock.cipher()
        log.debug("TLS established: %s, %s", sock.version(), cipher[0] if cipher else "?")


def _describe(exc: ssl.SSLError) -> str:
    """OpenSSL's reason, readable: ``WRONG_VERSION_NUMBER`` is a peer that does not speak TLS."""
    reason = exc.reason or ""
    if reason in {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNEXPECTED_EOF_WHILE_READING"} or (
            isinstance(exc, ssl.SSLEOFError)):
        return f"the peer does not speak TLS or closed the connection ({reason or exc})"
    if reason in {"PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"}:
        return f"no client certificate presented, and one is required ({reason})"
    if reason in {"UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION"}:
        return f"the peer offers only TLS versions older than 1.2 ({reason})"
    if "CERTIFICATE" in reason or "CA" in reason.split("_"):
        return f"certificate refused by the other side ({reason})"
    return reason or str(exc)


def _load_identity(context: ssl.SSLContext, settings: TlsSettings) -> None:
    """The node's certificate (chain) and key, each file checked with its own message."""
    certificate, key = settings.certificate, settings.key
    _readable(certificate, "certificate")
    _readable(key, "key")
    try:  # a throwaway context reads the certificates alone (load_cert_chain reads both)
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(certificate))
    except ssl.SSLError as exc:
        raise StartupError(f"tls.certificate: no PEM certificate in {certificate}") from exc

    def no_password() -> str:
        raise _EncryptedKey

    try:
        context.load_cert_chain(str(certificate), str(key), password=no_password)
    except _EncryptedKey as exc:
        raise StartupError(f"tls.key: {key} is encrypted; the node needs it unencrypted "
                           "(readable only by the node's user)") from exc
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise StartupError(f"tls.key: {key} is not the key of the certificate "
                               f"{certificate}") from exc
        raise StartupError(f"tls.key: no PEM private key in {key}") from exc


def _load_ca(context: ssl.SSLContext, ca: Path) -> None:
    _readable(ca, "ca")
    try:
        context.load_verify_locations(cafile=str(ca))
    except ssl.SSLError as exc:
        raise StartupError(f"tls.ca: no PEM certificate in {ca}") from exc


def _readable(path: Path, key: str) -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise StartupError(f"tls.{key}: cannot read {path}: {exc.strerror or exc}") from exc

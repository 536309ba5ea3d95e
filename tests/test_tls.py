"""DICOM TLS (PS3.15 B.9-B.12): a TLS listener beside the plain one, and TLS toward peers.

Certificates are made for the session with the ``openssl`` command: a throwaway CA, the node's
certificate (IP address 127.0.0.1, used by the listener and to call peers), a client's, a
second CA nobody trusts with a certificate of its own.  The clients are real: pynetdicom, and
DCMTK's echoscu, storescu and storescp (its default BCP 195 profile); the node is a process
started from its YAML like an administrator's.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests import retrievedata as rd
from tests.conftest import (
    REPO,
    NodeProcess,
    dcmtk_env,
    dcmtk_tool,
    free_port,
    make_node,
    poll_until,
)
from tests.dicomdata import CT_IMAGE, encoded_as, make_instance, write_part10

OPENSSL = Path("/usr/bin/openssl")
TIMEOUT = 10.0


@dataclass(frozen=True)
class Pki:
    """Files made by openssl in one folder (PEM, keys unencrypted)."""

    folder: Path

    def __getitem__(self, name: str) -> Path:
        return self.folder / name


def _openssl(folder: Path, *args: str) -> None:
    subprocess.run([str(OPENSSL), *args], cwd=folder, check=True, capture_output=True,
                   timeout=60)


def _issue(folder: Path, name: str, subject: str, ca: str, extensions: str) -> None:
    """``name``.key/.crt: an RSA key and its certificate signed by ``ca``.key/.crt."""
    (folder / f"{name}.ext").write_text(extensions, encoding="ascii")
    _openssl(folder, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", subject)
    _openssl(folder, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey",
             f"{ca}.key", "-CAcreateserial", "-days", "2", "-sha256", "-out", f"{name}.crt",
             "-extfile", f"{name}.ext")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if not OPENSSL.exists():
        pytest.skip("openssl command not installed")
    folder = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue-ca"):
        _openssl(folder, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                 f"{ca}.key", "-out", f"{ca}.crt", "-days", "2", "-sha256", "-subj",
                 f"/CN=Test {ca}", "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    both = "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1\n"
    _issue(folder, "node", "/CN=DICOMNODE", "ca", both)  # listener and caller
    _issue(folder, "peer", "/CN=SECURE", "ca", both)  # storescp, the TLS move destination
    _issue(folder, "client", "/CN=TESTSCU", "ca", "extendedKeyUsage=clientAuth\n")
    _issue(folder, "rogue", "/CN=ROGUE", "rogue-ca", both)
    return Pki(folder)


def tls_settings(pki: Pki, **overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {"port": free_port(), "certificate": str(pki["node.crt"]),
                                "key": str(pki["node.key"]), "ca": str(pki["ca.crt"]),
                                "require_client_certificate": True}
    settings.update(overrides)
    return settings


def client_context(pki: Pki, certificate: str | None = "client") -> ssl.SSLContext:
    """A TLS client trusting the test CA, presenting ``certificate`` (None: no certificate)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca.crt"]))
    if certificate is not None:
        context.load_cert_chain(str(pki[f"{certificate}.crt"]), str(pki[f"{certificate}.key"]))
    return context


def associate(port: int, context: ssl.SSLContext | None, calling: str = "TESTSCU",
              contexts: tuple[str, ...] = (Verification,)) -> Association:
    ae = AE(ae_title=calling)
    for abstract in contexts:
        ae.add_requested_context(abstract, [ImplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = TIMEOUT
    tls_args = (context, "127.0.0.1") if context is not None else None
    return ae.associate("127.0.0.1", port, ae_title="DICOMNODE", tls_args=tls_args)


def tls_echo(port: int, context: ssl.SSLContext | None) -> bool:
    """True when a C-ECHO over TLS (plain with None) is answered Success."""
    assoc = associate(port, context)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return "Status" in status and int(status.Status) == 0
    finally:
        assoc.release()


def tls_port(node: NodeProcess) -> int:
    return int(node.settings["tls"]["port"])


def stored(node: NodeProcess, sop_instance_uid: str) -> bool:
    return node.rows("SELECT count(*) FROM instance WHERE sop_instance_uid = ?",
                     sop_instance_uid) == [(1,)]


@pytest.fixture(scope="module")
def secure_node(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[NodeProcess]:
    """A node with a plain and a TLS listener, requiring client certificates."""
    node = make_node(tmp_path_factory.mktemp("tls") / "node", tls=tls_settings(pki)).start()
    yield node
    if node.process is not None and node.process.poll() is None:
        assert node.stop() == 0


# --- the TLS listener ------------------------------------------------------------------------

def test_both_listeners_are_logged_and_the_plain_one_answers(secure_node: NodeProcess) -> None:
    log = secure_node.wait_for_log("TLS listening on")
    assert f"TLS listening on 127.0.0.1:{tls_port(secure_node)} (client certificates " \
           "required)" in log
    assert tls_echo(secure_node.port, None)


def test_pynetdicom_echo_and_store_over_tls(secure_node: NodeProcess, pki: Pki) -> None:
    context = client_context(pki)
    assert tls_echo(tls_port(secure_node), context)
    ds = make_instance()
    assoc = associate(tls_port(secure_node), context, contexts=(CT_IMAGE,))
    assert assoc.is_established
    try:
        assert isinstance(assoc.dul.socket.socket, ssl.SSLSocket)
        assert assoc.dul.socket.socket.version() in {"TLSv1.2", "TLSv1.3"}
        status = assoc.send_c_store(encoded_as(ds))
        assert "Status" in status and int(status.Status) == 0
    finally:
        assoc.release()
    assert stored(secure_node, str(ds.SOPInstanceUID))


def test_dcmtk_echoscu_and_storescu_over_tls(secure_node: NodeProcess, pki: Pki,
                                              tmp_path: Path) -> None:
    tls = ["+tls", str(pki["client.key"]), str(pki["client.crt"]), "+cf", str(pki["ca.crt"])]
    target = ["-aec", "DICOMNODE", "127.0.0.1", str(tls_port(secure_node))]
    echoed = subprocess.run([str(dcmtk_tool("echoscu")), *tls, *target], env=dcmtk_env(),
                            capture_output=True, text=True, timeout=60)
    assert echoed.returncode == 0, echoed.stderr
    ds = make_instance()
    path = write_part10(ds, tmp_path / "ct.dcm")
    sent = subprocess.run([str(dcmtk_tool("storescu")), *tls, *target, str(path)],
                          env=dcmtk_env(), capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stderr
    assert stored(secure_node, str(ds.SOPInstanceUID))
    # The same tool without TLS on the TLS port gets nowhere.
    plain = subprocess.run([str(dcmtk_tool("echoscu")), *target], env=dcmtk_env(),
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode != 0


def test_a_client_without_certificate_is_refused_when_one_is_required(
        secure_node: NodeProcess, pki: Pki) -> None:
    refusals = secure_node.log().count("TLS connection from 127.0.0.1 refused")
    assert not tls_echo(tls_port(secure_node), client_context(pki, certificate=None))
    secure_node.wait_for_log("TLS connection from 127.0.0.1 refused", refusals + 1)
    # DCMTK's anonymous TLS too.
    anonymous = subprocess.run(
        [str(dcmtk_tool("echoscu")), "+tla", "+cf", str(pki["ca.crt"]), "-aec", "DICOMNODE",
         "127.0.0.1", str(tls_port(secure_node))],
        env=dcmtk_env(), capture_output=True, text=True, timeout=60)
    assert anonymous.returncode != 0
    assert tls_echo(tls_port(secure_node), client_context(pki))  # and it still serves


def test_a_certificate_from_another_ca_is_refused(secure_node: NodeProcess, pki: Pki) -> None:
    assert not tls_echo(tls_port(secure_node), client_context(pki, certificate="rogue"))
    secure_node.wait_for_log("certificate refused")
    assert tls_echo(tls_port(secure_node), client_context(pki))


def test_a_plain_client_on_the_tls_port_fails_cleanly(secure_node: NodeProcess,
                                                      pki: Pki) -> None:
    assert not tls_echo(tls_port(secure_node), None)
    secure_node.wait_for_log("does not speak TLS")
    assert tls_echo(tls_port(secure_node), client_context(pki))
    assert tls_echo(secure_node.port, None)
    assert secure_node.process is not None and secure_node.process.poll() is None


def test_a_silent_connection_does_not_hold_the_tls_listener(secure_node: NodeProcess,
                                                            pki: Pki) -> None:
    """The handshake waits in the connection's thread, not in the accepting one."""
    with socket.create_connection(("127.0.0.1", tls_port(secure_node)), timeout=TIMEOUT):
        assert tls_echo(tls_port(secure_node), client_context(pki))


def test_a_client_without_certificate_is_accepted_when_not_required(
        node_factory: Any, pki: Pki) -> None:
    node = node_factory(tls=tls_settings(pki, require_client_certificate=False)).start()
    assert "client certificates verified when presented" in node.wait_for_log("TLS listening")
    assert tls_echo(tls_port(node), client_context(pki, certificate=None))
    assert tls_echo(tls_port(node), client_context(pki))
    # Presented, a certificate must still verify.
    assert not tls_echo(tls_port(node), client_context(pki, certificate="rogue"))
    assert node.stop() == 0


def test_sigterm_stops_both_listeners(node_factory: Any, pki: Pki) -> None:
    node = node_factory(tls=tls_settings(pki)).start()
    assert tls_echo(tls_port(node), client_context(pki))
    assert node.stop() == 0
    assert "stopped" in node.log()
    for port in (node.port, tls_port(node)):
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()


# --- start-up checks -------------------------------------------------------------------------

def _serve(tmp_path: Path, tls: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"ae_title": "DICOMNODE", "bind": "127.0.0.1",
                                      "port": free_port(), "storage": "storage", "tls": tls}),
                      encoding="utf-8")
    return subprocess.run([sys.executable, "-m", "node", "serve", "-c", str(config)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("change", "message"), [
    ({"certificate": "missing.crt"}, "tls.certificate: cannot read {tmp}/missing.crt"),
    ({"key": "{pki}/client.key"}, "tls.key: {pki}/client.key is not the key of the certificate"),
    ({"certificate": "{pki}/node.key"}, "tls.certificate: no PEM certificate in {pki}/node.key"),
    ({"ca": "{pki}/node.key"}, "tls.ca: no PEM certificate in {pki}/node.key"),
])
def test_bad_files_stop_start_up_with_one_line(tmp_path: Path, pki: Pki, change: dict[str, str],
                                               message: str) -> None:
    places = {"pki": str(pki.folder), "tmp": str(tmp_path)}
    tls = tls_settings(pki, **{k: v.format(**places) for k, v in change.items()})
    done = _serve(tmp_path, tls)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert any(message.format(**places) in line for line in lines), done.stderr
    assert "Traceback" not in done.stderr
    assert len([line for line in lines if "tls." in line]) == 1, done.stderr


def test_an_encrypted_key_stops_start_up(tmp_path: Path, pki: Pki) -> None:
    _openssl(tmp_path, "pkey", "-in", str(pki["node.key"]), "-aes256", "-passout", "pass:x",
             "-out", "encrypted.key")
    done = _serve(tmp_path, tls_settings(pki, key=str(tmp_path / "encrypted.key")))
    assert done.returncode != 0
    assert "is encrypted" in done.stderr, done.stderr


# --- TLS toward peers ------------------------------------------------------------------------

@dataclass
class StoreSCP:
    port: int
    out: Path
    process: subprocess.Popen[bytes]


@pytest.fixture
def tls_storescp(tmp_path: Path, pki: Pki) -> Iterator[StoreSCP]:
    """DCMTK's storescp over TLS as SECURE, requiring the caller's certificate (its default)."""
    out = tmp_path / "received"
    out.mkdir()
    port = free_port()
    process = subprocess.Popen(
        [str(dcmtk_tool("storescp")), "+tls", str(pki["peer.key"]), str(pki["peer.crt"]),
         "+cf", str(pki["ca.crt"]), "-aet", "SECURE", "-od", str(out), str(port)],
        env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        context = client_context(pki)

        def answers() -> bool:
            assert process.poll() is None, "storescp exited"
            ae = AE(ae_title="TESTSCU")
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", port, ae_title="SECURE",
                                 tls_args=(context, "127.0.0.1"))
            if not assoc.is_established:
                return False
            assoc.release()
            return True

        assert poll_until(answers, 20, 0.05), "storescp did not answer over TLS"
        yield StoreSCP(port, out, process)
    finally:
        process.terminate()
        process.wait(10)


def caller_config(folder: Path, pki: Pki, peers: dict[str, Any],
                  tls: dict[str, Any] | None) -> Path:
    config = folder / "caller.yaml"
    settings: dict[str, Any] = {"ae_title": "CALLER", "storage": "storage", "peers": peers}
    if tls is not None:
        settings["tls"] = tls
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return config


def cli_echo(config: Path, peer: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", "echo", "-c", str(config), peer,
                           "--timeout", str(TIMEOUT)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def test_c_move_to_a_tls_peer(node_factory: Any, pki: Pki, tls_storescp: StoreSCP) -> None:
    peers = {"SECURE": {"host": "127.0.0.1", "port": tls_storescp.port, "tls": True}}
    node = node_factory(tls=tls_settings(pki), peers=peers).start()
    study = make_instance().StudyInstanceUID
    instances = [make_instance(study=study) for _ in range(3)]
    assoc = associate(node.port, None, contexts=(CT_IMAGE,))
    assert assoc.is_established
    try:
        for ds in instances:
            assert int(assoc.send_c_store(encoded_as(ds)).Status) == 0
    finally:
        assoc.release()
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study
    responses = rd.move(node.port, "study", query, destination="SECURE")
    assert responses.status == 0, responses.final
    assert int(responses.final.NumberOfCompletedSuboperations) == 3
    assert set(rd.received_by_uid(tls_storescp.out)) == {str(ds.SOPInstanceUID)
                                                         for ds in instances}


def test_c_move_to_a_tls_peer_with_an_untrusted_certificate_fails_the_sub_operations(
        node_factory: Any, pki: Pki, tmp_path: Path) -> None:
    """The peer's certificate comes from a CA the node does not trust: nothing is sent, and
    the log says why."""
    port = free_port()
    process = subprocess.Popen(
        [str(dcmtk_tool("storescp")), "+tls", str(pki["rogue.key"]), str(pki["rogue.crt"]),
         "+cf", str(pki["ca.crt"]), "-aet", "SECURE", "-od", str(tmp_path), str(port)],
        env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert poll_until(lambda: _listening(port, process), 20)
        peers = {"SECURE": {"host": "127.0.0.1", "port": port, "tls": True}}
        node = node_factory(tls=tls_settings(pki), peers=peers).start()
        ds = make_instance()
        assoc = associate(node.port, None, contexts=(CT_IMAGE,))
        assert assoc.is_established
        try:
            assert int(assoc.send_c_store(encoded_as(ds)).Status) == 0
        finally:
            assoc.release()
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ds.StudyInstanceUID
        responses = rd.move(node.port, "study", query, destination="SECURE")
        assert responses.status != 0
        assert int(responses.final.NumberOfCompletedSuboperations) == 0
        node.wait_for_log("certificate refused")
        assert not [p for p in tmp_path.iterdir() if p.is_file()]
    finally:
        process.terminate()
        process.wait(10)


def _listening(port: int, process: subprocess.Popen[bytes]) -> bool:
    assert process.poll() is None, "storescp exited"
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_dicom_node_echo_to_a_tls_peer(tmp_path: Path, pki: Pki, tls_storescp: StoreSCP,
                                       secure_node: NodeProcess) -> None:
    tls = tls_settings(pki, port=free_port())
    peers = {"SECURE": {"host": "127.0.0.1", "port": tls_storescp.port, "tls": True},
             "DICOMNODE": {"host": "127.0.0.1", "port": tls_port(secure_node), "tls": True},
             "PLAINPORT": {"host": "127.0.0.1", "port": secure_node.port, "tls": True},
             "NOTLS": {"host": "127.0.0.1", "port": tls_storescp.port}}
    config = caller_config(tmp_path, pki, peers, tls)
    for peer in ("SECURE", "DICOMNODE"):
        done = cli_echo(config, peer)
        assert done.returncode == 0, done.stderr
        assert "C-ECHO answered" in done.stdout
    # A TLS peer on a port that does not speak TLS, and a plain call to a TLS port.
    done = cli_echo(config, "PLAINPORT")
    assert done.returncode == 1
    line, = done.stderr.strip().splitlines()
    assert line.startswith(f"dicom-node: TLS with PLAINPORT at 127.0.0.1:{secure_node.port} "
                           "failed: the peer does not speak TLS"), line
    done = cli_echo(config, "NOTLS")
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_dicom_node_echo_refuses_an_untrusted_peer(tmp_path: Path, pki: Pki,
                                                   secure_node: NodeProcess) -> None:
    """Calling with a CA the peer's certificate does not come from: refused, said in one line."""
    tls = tls_settings(pki, port=free_port(), ca=str(pki["rogue-ca.crt"]),
                       require_client_certificate=False)
    peers = {"DICOMNODE": {"host": "127.0.0.1", "port": tls_port(secure_node), "tls": True}}
    done = cli_echo(caller_config(tmp_path, pki, peers, tls), "DICOMNODE")
    assert done.returncode == 1
    line, = done.stderr.strip().splitlines()
    assert line.startswith("dicom-node: TLS with DICOMNODE at 127.0.0.1:")
    assert "failed: certificate refused: " in line, line


def test_a_tls_peer_without_tls_settings_is_refused_with_a_reason(
        tmp_path: Path, pki: Pki, secure_node: NodeProcess) -> None:
    peers = {"DICOMNODE": {"host": "127.0.0.1", "port": tls_port(secure_node), "tls": True}}
    done = cli_echo(caller_config(tmp_path, pki, peers, None), "DICOMNODE")
    assert done.returncode == 1
    assert "has no tls settings" in done.stderr, done.stderr


def test_a_peer_refusing_the_nodes_certificate_is_said_in_one_line(
        tmp_path: Path, pki: Pki, secure_node: NodeProcess) -> None:
    """The caller presents a certificate the peer's CA did not issue."""
    tls = tls_settings(pki, port=free_port(), certificate=str(pki["rogue.crt"]),
                       key=str(pki["rogue.key"]))
    peers = {"DICOMNODE": {"host": "127.0.0.1", "port": tls_port(secure_node), "tls": True}}
    refusals = secure_node.log().count("refused: certificate refused: unable to get local")
    done = cli_echo(caller_config(tmp_path, pki, peers, tls), "DICOMNODE")
    assert done.returncode == 1
    line, = done.stderr.strip().splitlines()
    assert line.startswith(f"dicom-node: TLS with DICOMNODE at 127.0.0.1:{tls_port(secure_node)}"
                           ) or "refused this node's certificate" in line, line
    secure_node.wait_for_log("refused: certificate refused: unable to get local", refusals + 1)


def test_the_hostname_is_checked_only_without_a_private_ca(pki: Pki) -> None:
    from node.config import TlsSettings
    from node.tls import client_context as node_client_context
    from node.tls import server_context

    with_ca = TlsSettings(2762, pki["node.crt"], pki["node.key"], pki["ca.crt"], True)
    calling = node_client_context(with_ca)
    assert calling.verify_mode == ssl.CERT_REQUIRED and not calling.check_hostname
    assert calling.minimum_version == ssl.TLSVersion.TLSv1_2
    public = node_client_context(TlsSettings(2762, pki["node.crt"], pki["node.key"]))
    assert public.verify_mode == ssl.CERT_REQUIRED and public.check_hostname
    assert server_context(with_ca).verify_mode == ssl.CERT_REQUIRED
    optional = TlsSettings(2762, pki["node.crt"], pki["node.key"], pki["ca.crt"], False)
    assert server_context(optional).verify_mode == ssl.CERT_OPTIONAL
    no_ca = server_context(TlsSettings(2762, pki["node.crt"], pki["node.key"]))
    assert no_ca.verify_mode == ssl.CERT_NONE
    assert no_ca.minimum_version == ssl.TLSVersion.TLSv1_2

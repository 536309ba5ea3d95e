"""Access control against a running node: who may associate, and which services each caller may use.

Rejected associations are checked for their A-ASSOCIATE-RJ (PS3.8 Table 9-21), refused requests
for 0x0124 (Refused: Not Authorized, PS3.7 C.5), both with pynetdicom and DCMTK's tools.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from node.config import ConfigError, build_config
from tests import retrievedata as rd
from tests.conftest import NodeProcess, dcmtk_env, dcmtk_tool, free_port, poll_until
from tests.dicomdata import PREFIX, make_instance, reactor_paused, send_datasets

STUDY = f"{PREFIX}91.1"
NOT_AUTHORIZED = 0x0124


def associate(port: int, calling: str, *contexts: Any, roles: Any = ()) -> Association:
    """An association from ``calling``; C-STOREs it receives (C-GET) are answered Success."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for context in contexts or (Verification,):
        if context is CTImageStorage:
            ae.add_requested_context(context, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        else:
            ae.add_requested_context(context)
    return ae.associate("127.0.0.1", port, ae_title="DICOMNODE", ext_neg=list(roles),
                        evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])


def rejection(assoc: Association) -> tuple[int, int, int]:
    assert assoc.is_rejected, "the association was not rejected"
    rsp = assoc.acceptor.primitive
    return int(rsp.result), int(rsp.result_source), int(rsp.diagnostic)


def statuses(assoc: Association, service: str) -> list[int]:
    """The statuses a C-FIND, C-GET or C-MOVE of STUDY gets (all responses, in order)."""
    query = rd.identifier("STUDY", StudyInstanceUID=STUDY)
    try:
        if service == "find":
            responses = reactor_paused(assoc).send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind)
        elif service == "get":
            responses = assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)
        else:
            responses = assoc.send_c_move(query, "NOWHERE",
                                          StudyRootQueryRetrieveInformationModelMove)
        return [int(status.Status) for status, _ in responses]
    finally:
        assoc.release()


def all_services(port: int, calling: str) -> dict[str, int]:
    """The final status of each service for ``calling`` (a fresh association for each)."""
    found: dict[str, int] = {}
    assoc = associate(port, calling)
    assert assoc.is_established
    found["echo"] = int(assoc.send_c_echo().Status)
    assoc.release()
    found["store"] = send_datasets(port, [make_instance(study=STUDY)], calling=calling)[0].status
    for service, model in (("find", StudyRootQueryRetrieveInformationModelFind),
                           ("get", StudyRootQueryRetrieveInformationModelGet),
                           ("move", StudyRootQueryRetrieveInformationModelMove)):
        roles = [build_role(CTImageStorage, scp_role=True)] if service == "get" else []
        assoc = associate(port, calling, model, CTImageStorage, roles=roles)
        assert assoc.is_established
        found[service] = statuses(assoc, service)[-1]
    return found


@pytest.fixture
def default_node(node_factory: Any) -> NodeProcess:
    """A node on the embedded defaults of the access rules (no unknown_peers key at all)."""
    node: NodeProcess = node_factory(peers={
        "VIEWER": {"host": "127.0.0.1", "port": free_port()},
        "SENDER": {"host": "127.0.0.1", "port": free_port(), "services": ["echo", "store"]},
    })
    node.settings.pop("unknown_peers")
    return node.start()


def test_an_unknown_caller_may_echo_and_store_but_not_query_or_retrieve(
        default_node: NodeProcess) -> None:
    found = all_services(default_node.port, "STRANGER")
    assert found == {"echo": 0, "store": 0, "find": NOT_AUTHORIZED, "get": NOT_AUTHORIZED,
                     "move": NOT_AUTHORIZED}
    log = default_node.wait_for_log("FIND from STRANGER at 127.0.0.1 refused")
    assert "MOVE from STRANGER at 127.0.0.1 refused" in log


def test_a_configured_peer_may_do_what_its_services_say(default_node: NodeProcess) -> None:
    viewer = all_services(default_node.port, "VIEWER")
    assert viewer["echo"] == viewer["store"] == viewer["find"] == 0
    assert viewer["get"] == 0  # nothing of STUDY it may not have: the instance was stored
    assert viewer["move"] == 0xA801  # NOWHERE is no peer: the request itself was allowed
    sender = all_services(default_node.port, "SENDER")
    assert sender["echo"] == sender["store"] == 0
    assert sender["find"] == sender["get"] == sender["move"] == NOT_AUTHORIZED


def test_dcmtk_findscu_from_an_unknown_ae_is_refused(default_node: NodeProcess) -> None:
    result = subprocess.run(
        [str(dcmtk_tool("findscu")), "-v", "-S", "-aet", "STRANGER", "-aec", "DICOMNODE",
         "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=", "127.0.0.1",
         str(default_node.port)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=30, check=False)
    output = result.stdout + result.stderr
    # DCMTK 3.6.7 has no name for 0x0124: "Received Final Find Response (Unknown Status: 0x124)"
    assert "Final Find Response" in output and "0x124)" in output, output
    assert "Pending" not in output  # no match was sent


def test_the_nodes_own_title_from_this_host_may_query(default_node: NodeProcess) -> None:
    """`dicom-node find DICOMNODE` is the administrator's own tool on the node's host."""
    send_datasets(default_node.port, [make_instance(study=STUDY)])
    assoc = associate(default_node.port, "DICOMNODE", StudyRootQueryRetrieveInformationModelFind)
    assert statuses(assoc, "find") == [0xFF00, 0x0000]


def test_unknown_callers_can_be_refused_the_association(node_factory: Any) -> None:
    node: NodeProcess = node_factory(unknown_peers="none", peers={
        "VIEWER": {"host": "127.0.0.1", "port": free_port()},
        "TESTSCU": {"host": "127.0.0.1", "port": free_port()},  # the fixture's readiness echo
    }).start()
    assert rejection(associate(node.port, "STRANGER")) == (1, 1, 3)
    assert associate(node.port, "VIEWER").is_established
    log = node.wait_for_log("association from STRANGER at 127.0.0.1 rejected")
    assert "not a configured peer" in log
    # DCMTK says why in its own words.
    result = subprocess.run(
        [str(dcmtk_tool("echoscu")), "-aet", "STRANGER", "-aec", "DICOMNODE", "127.0.0.1",
         str(node.port)], capture_output=True, text=True, env=dcmtk_env(), timeout=30,
        check=False)
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stdout + result.stderr


def test_a_peer_bound_to_its_address(node_factory: Any) -> None:
    node: NodeProcess = node_factory(peers={
        "HERE": {"host": "127.0.0.1", "port": free_port(), "check_address": True},
        "THERE": {"host": "192.0.2.10", "port": free_port(), "check_address": True},
        "LOOSE": {"host": "192.0.2.11", "port": free_port()},
    }).start()
    assert associate(node.port, "HERE").is_established
    assert rejection(associate(node.port, "THERE")) == (1, 1, 3)
    assert associate(node.port, "LOOSE").is_established  # check_address is off by default
    assert "configured for host 192.0.2.10, not 127.0.0.1" in node.wait_for_log(
        "association from THERE")


def test_move_destinations_of_a_peer(node_factory: Any) -> None:
    down = free_port()  # nothing listens there
    node: NodeProcess = node_factory(peers={
        "WS1": {"host": "127.0.0.1", "port": down},
        "WS2": {"host": "127.0.0.1", "port": down},
        "VIEWER": {"host": "127.0.0.1", "port": down, "move_destinations": ["WS1"]},
    }).start()
    send_datasets(node.port, [make_instance(study=STUDY)])

    def move_to(destination: str) -> int:
        assoc = associate(node.port, "VIEWER", StudyRootQueryRetrieveInformationModelMove)
        query = rd.identifier("STUDY", StudyInstanceUID=STUDY)
        try:
            responses = list(assoc.send_c_move(query, destination,
                                               StudyRootQueryRetrieveInformationModelMove))
        finally:
            assoc.release()
        return int(responses[-1][0].Status)

    assert move_to("WS2") == 0xA801  # not one of VIEWER's destinations
    assert move_to("WS1") == 0xA702  # allowed; the destination is down: every sub-op failed


def test_associations_per_peer_are_limited(node_factory: Any) -> None:
    node: NodeProcess = node_factory(max_associations_per_peer=1).start()
    first = associate(node.port, "BUSY")
    assert first.is_established
    try:
        assert rejection(associate(node.port, "BUSY")) == (2, 3, 2)  # local limit exceeded
        other = associate(node.port, "CALM")
        assert other.is_established
        other.release()
    finally:
        first.release()
    assert poll_until(lambda: associate(node.port, "BUSY").is_established, 10)


def test_access_rules_change_on_reload_without_dropping_associations(
        node_factory: Any) -> None:
    node: NodeProcess = node_factory().start()  # unknown_peers: all (the suite's setting)
    send_datasets(node.port, [make_instance(study=STUDY)])
    held = associate(node.port, "STRANGER", StudyRootQueryRetrieveInformationModelFind)
    assert held.is_established
    node.settings["unknown_peers"] = "store"
    node.write_config()
    assert node.process is not None
    os.kill(node.process.pid, signal.SIGHUP)
    node.wait_for_log("unknown_peers all -> store")
    # The association opened before the reload stands; its next query meets the new rule.
    assert statuses(held, "find") == [NOT_AUTHORIZED]


def test_access_config_is_checked(tmp_path: Path) -> None:
    peers = {"A": {"host": "h", "port": 104, "move_destinations": ["B"]}}
    with pytest.raises(ConfigError, match=r"peers\.A\.move_destinations: 'B' is not a configured"):
        build_config({"peers": peers}, tmp_path)
    with pytest.raises(ConfigError, match=r"peers\.A\.services: unknown service 'query'"):
        build_config({"peers": {"A": {"host": "h", "port": 1, "services": ["query"]}}},
                     tmp_path)
    with pytest.raises(ConfigError, match="unknown_peers: must be one of"):
        build_config({"unknown_peers": "some"}, tmp_path)
    config = build_config({"peers": {"A": {"host": "h", "port": 1, "services": ["Find"]}}},
                          tmp_path)
    assert {s.value for s in config.peers["A"].services} == {"find"}

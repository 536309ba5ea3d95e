"""Configuration: typed defaults, path resolution, and errors that name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from node.config import (
    SETTINGS,
    ConfigError,
    DuplicatePolicy,
    build_config,
    load_config,
)
from node.store_sync import StoreSync

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config" / "node.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_embedded_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None)
    assert (config.ae_title, config.port) == ("DICOMNODE", 11112)
    assert config.storage == tmp_path / "storage"
    assert config.database.path == tmp_path / "storage" / "index.sqlite"
    assert config.duplicates is DuplicatePolicy.KEEP
    assert config.store_sync is StoreSync.FILESYSTEM
    assert dict(config.peers) == {}


def test_relative_paths_resolve_against_config_folder(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "storage: data\ndatabase: sqlite:///db/index.sqlite\n"))
    assert config.storage == tmp_path / "data"
    assert config.database.path == tmp_path / "db" / "index.sqlite"


def test_absolute_sqlite_url(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, f"database: sqlite:///{tmp_path}/x.sqlite\n"))
    assert config.database.path == tmp_path / "x.sqlite"


def test_postgresql_url_hides_password(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "database: postgresql://u:secret@db:5432/pacs\n"))
    assert config.database.scheme == "postgresql"
    assert "secret" not in config.database.describe()


def test_peers_are_typed(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "peers:\n  PACS: {host: 10.0.0.1, port: 104}\n"))
    assert config.peers["PACS"].host == "10.0.0.1"
    assert config.peers["PACS"].port == 104


def test_store_sync_per_file(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "store_sync: file\n")).store_sync is StoreSync.FILE


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(None)
    with pytest.raises(AttributeError):
        config.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("colour: blue\n", "colour"),
        ("port: eleven\n", "port"),
        ("port: 70000\n", "port"),
        ("port: true\n", "port"),
        ("ae_title: THIS_TITLE_IS_MUCH_TOO_LONG\n", "ae_title"),
        ("ae_title: 'BAD\\TITLE'\n", "ae_title"),
        ("duplicates: sometimes\n", "duplicates"),
        ("store_sync: never\n", "store_sync"),
        ("database: mysql://x/y\n", "database"),
        ("max_pdu: 100\n", "max_pdu"),
        ("dimse_timeout: -1\n", "dimse_timeout"),
        ("max_associations: 0\n", "max_associations"),
        ("log_level: loud\n", "log_level"),
        ("peers: [a, b]\n", "peers"),
        ("peers:\n  PACS: {host: h}\n", "peers.PACS.port"),
        ("peers:\n  PACS: {host: h, port: 104, colour: red}\n", "peers.PACS.colour"),
        ("peers:\n  PACS: {host: h, port: 0}\n", "peers.PACS.port"),
        ("peers:\n  PACS: {host: '', port: 104}\n", "peers.PACS.host"),
    ],
)
def test_bad_value_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert str(caught.value).startswith(f"{key}:")


def test_broken_yaml_says_where(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="line 2"):
        load_config(write(tmp_path, "port: 1\n  bad: [\n"))


def test_example_config_loads_and_documents_every_setting() -> None:
    config = load_config(EXAMPLE)
    assert config.ae_title == "DICOMNODE"
    text = EXAMPLE.read_text(encoding="utf-8")
    documented = set(re.findall(r"^#? ?([a-z_]+):", text, flags=re.MULTILINE))
    assert set(SETTINGS) <= documented, set(SETTINGS) - documented


def test_build_config_rejects_unknown_key_first(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^aaa: unknown key"):
        build_config({"aaa": 1, "port": "x"}, tmp_path)

#!/usr/bin/env bash
# Set up everything the tests need on a fresh Debian/Ubuntu machine, then run them:
# DCMTK, Orthanc (and PostgreSQL when none runs) from apt, a virtualenv with the project and its
# test extras, ruff, mypy, then pytest twice: indexes on SQLite, then on PostgreSQL.
# Usage: scripts/test.sh [pytest arguments...]
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# DCMTK (storescu, findscu, movescu, getscu, storescp, dcmqrscp) and Orthanc are the real peers
# the tests talk to; the tests start their own Orthanc on free ports, never the packaged service.
missing=()
/usr/bin/storescu --version 2>/dev/null | grep -qi dcmtk || missing+=(dcmtk)
[ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing ${missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The suite runs twice: with every node's index on SQLite, then on PostgreSQL (each node the
# tests start gets its own new database). That needs a server on 127.0.0.1:5432 that lets user
# postgres in (trust auth, as on the project's machines, or DICOMNODE_TEST_POSTGRES with a
# password). Start the local cluster when it is installed but down; install one when none is.
start_clusters() {
    for version in /etc/postgresql/*; do
        [ -d "$version" ] || continue
        as_root pg_ctlcluster --skip-systemctl-redirect "$(basename "$version")" main start || true
    done
}
if ! { command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1; }; then
    if ! command -v pg_ctlcluster >/dev/null; then
        echo "== installing PostgreSQL"
        as_root apt-get update -qq
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq postgresql >/dev/null
    fi
    echo "== starting the local PostgreSQL cluster"
    start_clusters
    if [ -z "${DICOMNODE_TEST_POSTGRES:-}" ] && ! psql -h 127.0.0.1 -U postgres -w -c "" postgres \
            >/dev/null 2>&1; then
        # A fresh Debian cluster wants a password over TCP: give the test user one.
        as_root su postgres -c "psql -q -c \"ALTER USER postgres PASSWORD 'postgres'\"" || true
        export DICOMNODE_TEST_POSTGRES=postgresql://postgres:postgres@127.0.0.1:5432
    fi
fi

if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    python3 -m venv .venv
fi
echo "== installing the project with its test extras"
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'

echo "== ruff"
.venv/bin/ruff check node tests benchmarks
echo "== mypy"
.venv/bin/mypy
echo "== pytest, every index on SQLite"
.venv/bin/python -m pytest "$@"
echo "== pytest, every index on PostgreSQL"
DICOMNODE_TEST_BACKEND=postgresql .venv/bin/python -m pytest "$@"

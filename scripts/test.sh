#!/usr/bin/env bash
# Set up everything the tests need on a fresh Debian/Ubuntu machine, then run them:
# DCMTK and Orthanc from apt, a virtualenv with the project and its test extras, ruff, mypy and pytest.
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

# tests/test_postgresql.py needs a PostgreSQL server on 127.0.0.1:5432 (user postgres, trust
# auth, as on the project's machines); start the local cluster when it is installed but down.
if command -v pg_isready >/dev/null && ! pg_isready -q -h 127.0.0.1; then
    echo "== starting the local PostgreSQL cluster"
    for version in /etc/postgresql/*; do
        as_root pg_ctlcluster --skip-systemctl-redirect "$(basename "$version")" main start || true
    done
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
echo "== pytest"
.venv/bin/python -m pytest "$@"

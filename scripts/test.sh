#!/usr/bin/env bash
# Set up everything the tests need on a fresh Debian/Ubuntu machine, then run them:
# DCMTK from apt, a virtualenv with the project and its test extras, ruff, mypy and pytest.
# Usage: scripts/test.sh [pytest arguments...]
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if ! /usr/bin/storescu --version 2>/dev/null | grep -qi dcmtk; then
    echo "== installing DCMTK"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq dcmtk >/dev/null
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

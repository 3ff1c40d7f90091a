#!/usr/bin/env bash
# The system programs and services the test suite drives, checked in one place (`make test` and
# .ci/run both call this script). Programs that are missing are installed with apt-get when this
# runs as root or with password-less sudo (a CI runner); anywhere else, or when the install
# fails, the script stops at once with one line naming what to install.
#   chromium      the dashboard's browser test (Playwright drives the system's Chromium, since
#                 Playwright's own browser download needs the internet at test time)
#   wrk           bench/registry_load.py's smoke test (a C load generator)
#   redis-server  the Redis-restart test starts a private Redis of its own
# PostgreSQL and Redis themselves are services the tests connect to (tests/support/services.py,
# same MWT_TEST_* variables); they are checked, never installed or started here.
set -euo pipefail

# command -> Debian package
declare -A PACKAGE=([chromium]=chromium [wrk]=wrk [redis-server]=redis-server)

missing_programs() {
    local name out=""
    for name in chromium wrk redis-server; do
        command -v "$name" >/dev/null 2>&1 || out="$out ${PACKAGE[$name]}"
    done
    echo "${out# }"
}

die() {
    echo "error: $*" >&2
    exit 1
}

MISSING="$(missing_programs)"
if [ -n "$MISSING" ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            SUDO="sudo -n"
        else
            die "the tests need: $MISSING (install with: sudo apt-get install $MISSING)"
        fi
    fi
    command -v apt-get >/dev/null 2>&1 \
        || die "the tests need: $MISSING (no apt-get here: install them with the system's package manager)"
    echo "== installing $MISSING for the browser, load and Redis-restart tests"
    # shellcheck disable=SC2086  # one word per package
    { $SUDO apt-get update -qq \
        && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $MISSING >/dev/null; } \
        || die "apt-get install $MISSING failed (see apt-get's message above)"
    MISSING="$(missing_programs)"
    [ -z "$MISSING" ] || die "installed, but still not on PATH: $MISSING"
fi

# Where the tests look for the services (tests/support/services.py).
PG="${MWT_TEST_PG_HOST:-127.0.0.1}:${MWT_TEST_PG_PORT:-5432}"
REDIS="${MWT_TEST_REDIS_HOST:-127.0.0.1}:${MWT_TEST_REDIS_PORT:-6379}"
reachable() {
    timeout 2 bash -c "exec 3<>/dev/tcp/${1%:*}/${1##*:}" 2>/dev/null
}
DOWN=""
reachable "$PG" || DOWN="$DOWN PostgreSQL on $PG (MWT_TEST_PG_HOST/PORT),"
reachable "$REDIS" || DOWN="$DOWN Redis on $REDIS (MWT_TEST_REDIS_HOST/PORT),"
[ -z "$DOWN" ] || die "nothing answers for${DOWN%,} (start what is missing, README: Set-up, or point those variables at yours)"

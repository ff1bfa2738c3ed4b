#!/usr/bin/env bash
# Makes sure the database servers the backend tests talk to are running, and
# exports their URLs. Installs and starts what is missing when run as root
# (CI does); otherwise says what to do. Source it or run it.
#
#   PostgreSQL  FLUXO_TEST_POSTGRES_URL  (default postgres://postgres:postgres@127.0.0.1:5432/postgres)

set -uo pipefail

log() { printf '[services] %s\n' "$*" >&2; }
as_root() { [ "$(id -u)" = 0 ]; }
apt_updated=""
apt_install() {
    as_root || { log "not root: cannot install $*"; return 1; }
    if [ -z "$apt_updated" ]; then
        apt-get update -qq >&2 && apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

# ----- PostgreSQL ---------------------------------------------------------------
pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 >/dev/null 2>&1; }

ensure_postgres() {
    if ! command -v pg_isready >/dev/null 2>&1 || ! ls -d /etc/postgresql/*/main >/dev/null 2>&1; then
        log "installing PostgreSQL"
        apt_install postgresql postgresql-client || return 1
    fi
    if ! pg_up; then
        as_root || { log "PostgreSQL is not running; start it as root"; return 1; }
        local version
        version=$(ls /etc/postgresql | sort -V | tail -n 1)
        log "starting PostgreSQL $version"
        pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2 || true
        for _ in $(seq 1 30); do pg_up && break; sleep 1; done
    fi
    pg_up || { log "PostgreSQL did not come up"; return 1; }
    if as_root; then
        # Works with trust auth and with password (scram) auth over TCP alike.
        su postgres -c "psql -q -c \"ALTER USER postgres PASSWORD 'postgres'\"" >/dev/null 2>&1 || true
    fi
    export FLUXO_TEST_POSTGRES_URL="${FLUXO_TEST_POSTGRES_URL:-postgres://postgres:postgres@127.0.0.1:5432/postgres}"
    log "PostgreSQL ready at ${FLUXO_TEST_POSTGRES_URL}"
}

status=0
ensure_postgres || status=1
if [ "$status" != 0 ]; then
    log "some servers are unavailable; their tests skip locally and fail in CI"
fi
# When sourced, do not end the caller's shell.
return "$status" 2>/dev/null || exit "$status"

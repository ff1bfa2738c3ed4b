#!/usr/bin/env bash
# Makes sure the database servers the backend tests talk to are running, and
# exports their URLs. Installs and starts what is missing when run as root
# (CI does); otherwise says what to do. Source it or run it.
#
#   PostgreSQL  FLUXO_TEST_POSTGRES_URL  (default postgres://postgres:postgres@127.0.0.1:5432/postgres)
#   Redis       FLUXO_TEST_REDIS_URL     (default redis://127.0.0.1:6379)
#   MongoDB     FLUXO_TEST_MONGODB_URL   (default mongodb://127.0.0.1:27017/?directConnection=true)
#               MongoDB has no Debian package: a MongoDB wire-compatible server
#               (secantusdb, a one-node replica set with transactions) is
#               installed from PyPI into /opt/mongo-venv and started.

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

# ----- Redis --------------------------------------------------------------------
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

ensure_redis() {
    if ! command -v redis-server >/dev/null 2>&1; then
        log "installing Redis"
        apt_install redis-server || return 1
    fi
    if ! redis_up; then
        log "starting Redis"
        redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >&2 || true
        for _ in $(seq 1 30); do redis_up && break; sleep 0.5; done
    fi
    redis_up || { log "Redis did not come up"; return 1; }
    export FLUXO_TEST_REDIS_URL="${FLUXO_TEST_REDIS_URL:-redis://127.0.0.1:6379}"
    log "Redis ready at ${FLUXO_TEST_REDIS_URL}"
}

# ----- MongoDB (wire-compatible server) -------------------------------------------
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") >/dev/null 2>&1; }

ensure_mongodb() {
    if ! port_open 27017; then
        local venv=/opt/mongo-venv
        if [ ! -x "$venv/bin/secantusd-py" ]; then
            as_root || { log "not root: cannot install the MongoDB-compatible server"; return 1; }
            log "installing the MongoDB-compatible server (secantusdb) into $venv"
            python3 -m venv "$venv" >&2 || { apt_install python3-venv && python3 -m venv "$venv" >&2; } || return 1
            "$venv/bin/pip" install -q secantusdb >&2 || return 1
        fi
        log "starting the MongoDB-compatible server"
        mkdir -p /var/lib/secantus
        nohup "$venv/bin/secantusd-py" --host 127.0.0.1 --port 27017 --storage-path /var/lib/secantus \
            --log-level WARNING >/var/log/secantus.log 2>&1 &
        for _ in $(seq 1 60); do port_open 27017 && break; sleep 0.5; done
    fi
    port_open 27017 || { log "the MongoDB-compatible server did not come up"; return 1; }
    export FLUXO_TEST_MONGODB_URL="${FLUXO_TEST_MONGODB_URL:-mongodb://127.0.0.1:27017/?directConnection=true}"
    log "MongoDB ready at ${FLUXO_TEST_MONGODB_URL}"
}

status=0
ensure_postgres || status=1
ensure_redis || status=1
ensure_mongodb || status=1

if [ "$status" != 0 ]; then
    log "some servers are unavailable; their tests skip locally and fail in CI"
fi
# When sourced, do not end the caller's shell.
return "$status" 2>/dev/null || exit "$status"

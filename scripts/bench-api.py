#!/usr/bin/env python3
"""What a stateless `kairos api` replica costs and serves, on one machine (docs/SCALING.md,
"API replicas: measured").

It starts its own tansu broker (scripts/fetch-tansu.sh) and redis-server on free loopback ports,
fills a four-partition topic with `kairos bench --quick --scenario ingest` (the bench's realistic
events, 20,000 users), has one `kairos process` replica apply it (profiles to Redis, model updates
to the model topic), then measures, one server at a time on the two cores:

- start-up: how long a new `kairos api` takes to build its model from the model topic, what
  saving that model in Redis costs (`api.model_save_secs`), and how long the next replica takes
  to start from the save;
- for_you on the API replica, answers cached (1,000 users asked round robin, all cached after the
  first pass), then with the cache off (`api.cache_ttl_ms = 0`: every request reads the person's
  profiles from Redis), then the empty handler (`/healthz`) of the same replica;
- for_you on a `kairos serve` node on the same topic, with every profile in its own memory: the
  single-node reference.

Each load run is `kairos load` (the bench's load generator): at most throughput with 32
connections for 10 s, then at 2,000 requests/s for the latency.

Usage: cargo build --release && python3 scripts/bench-api.py [--fills 1] [--seconds 10]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchlib import (KAIROS, base_env, check_binaries, fill_topic, metrics, start_backends,
                      start_kairos, stop, wait_ready)

PARTITIONS = 4


def load(addr, paths_file, seconds, rate=None):
    cmd = [KAIROS, "load", "--addr", addr, "--paths", paths_file, "--seconds", str(seconds)]
    if rate:
        cmd += ["--rate", str(rate)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def settle(addr, name, quiet=3.0, limit=900):
    """Waits until metric `name` of `addr` stopped growing for `quiet` seconds: (value, when the
    last change was seen)."""
    last, changed, started = None, time.time(), time.time()
    while time.time() - started < limit:
        value = metrics(addr).get(name)
        if value != last:
            last, changed = value, time.time()
        elif value and time.time() - changed > quiet:
            return value, changed
        time.sleep(0.1)
    sys.exit(f"{name} of {addr} never settled")


def users(redis_port, prefix):
    out = subprocess.run(
        ["redis-cli", "-p", str(redis_port), "--scan", "--pattern", f"{prefix}:{{u:*"],
        check=True, capture_output=True, text=True).stdout
    ids = sorted(line.strip()[len(prefix) + 4:-1] for line in out.splitlines() if line.strip())
    if not ids:
        sys.exit("no user profile in Redis")
    return ids


def measure(what, addr, paths_file, seconds, rows):
    top = load(addr, paths_file, seconds)
    fixed = load(addr, paths_file, seconds, rate=2000)
    rows.append((what, top["requests_per_sec"], fixed["p50_us"], fixed["p99_us"]))
    print(f"  {what}: {top['requests_per_sec']:,.0f} req/s; at 2,000 req/s p50 "
          f"{fixed['p50_us']} µs, p99 {fixed['p99_us']} µs", file=sys.stderr)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fills", type=int, default=1,
                        help="runs of the quick ingest scenario that fill the topic")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each load run")
    args = parser.parse_args()
    check_binaries()
    work = tempfile.mkdtemp(prefix="kairos-api-bench-")
    backends, kafka_port, redis_port = start_backends(work)
    children = []
    try:
        env = base_env(kafka_port, redis_port, "kairos-api-bench", PARTITIONS)
        env["KAIROS_KAFKA__GROUP"] = f"api-bench-{os.getpid()}"
        env["KAIROS_REDIS__PREFIX"] = "apibench"
        fill_topic(env, work, args.fills)

        print("applying the topic with one kairos process", file=sys.stderr)
        process = start_kairos("process", env, os.path.join(work, "process"))
        children.append(process[0])
        applied, _ = settle(process[1], "kairos_group_events_applied_total")

        print("starting a kairos api replica", file=sys.stderr)
        started = time.time()
        saving_env = dict(env)
        saving_env["KAIROS_API__MODEL_SAVE_SECS"] = "2"
        api = start_kairos("api", saving_env, os.path.join(work, "api"))
        children.append(api[0])
        wait_ready(api[1], "kairos api")
        entries, done = settle(api[1], "kairos_model_entries_applied")
        build_s = done - started
        deadline = time.time() + 120
        while metrics(api[1]).get("kairos_model_saved_entries") != entries:
            if time.time() > deadline:
                sys.exit("the API replica never saved its model in Redis")
            time.sleep(0.2)
        saved = metrics(api[1])
        stop([process[0]])
        children.remove(process[0])

        ids = users(redis_port, "apibench")
        hot = os.path.join(work, "hot.txt")
        every = os.path.join(work, "every.txt")
        health = os.path.join(work, "health.txt")
        with open(hot, "w") as f:
            for u in ids[:1000]:
                f.write(f"/v1/recommendations?scenario=for_you&user_id={u}&k=10\n")
        with open(every, "w") as f:
            for u in ids:
                f.write(f"/v1/recommendations?scenario=for_you&user_id={u}&k=10\n")
        with open(health, "w") as f:
            f.write("/healthz\n")

        rows = []
        before = metrics(api[1])
        measure("api replica, for_you, answers cached", api[1], hot, args.seconds, rows)
        after = metrics(api[1])
        hits = after["kairos_api_cache_hits_total"] - before.get("kairos_api_cache_hits_total", 0)
        misses = (after["kairos_api_cache_misses_total"]
                  - before.get("kairos_api_cache_misses_total", 0))
        measure("api replica, empty handler", api[1], health, args.seconds, rows)
        stop([api[0]])
        children.remove(api[0])

        uncached_env = dict(env)
        uncached_env["KAIROS_API__CACHE_TTL_MS"] = "0"
        started = time.time()
        uncached = start_kairos("api", uncached_env, os.path.join(work, "api-uncached"))
        children.append(uncached[0])
        wait_ready(uncached[1], "kairos api")
        _, done = settle(uncached[1], "kairos_model_entries_applied")
        restore_s = done - started
        restored = metrics(uncached[1]).get("kairos_model_restored_entries", 0)
        measure("api replica, for_you, cache off (Redis read per request)", uncached[1], every,
                args.seconds, rows)
        stop([uncached[0]])
        children.remove(uncached[0])

        single_env = dict(env)
        del single_env["KAIROS_STATE"]
        single = start_kairos("serve", single_env, os.path.join(work, "serve"))
        children.append(single[0])
        wait_ready(single[1], "kairos serve")
        measure("serve node (profiles in memory), for_you", single[1], every, args.seconds, rows)

        print(f"\ntopic: {applied:,.0f} events applied by one kairos process; "
              f"{len(ids):,} users in Redis")
        print(f"api replica start-up: model of {entries:,.0f} entries built in {build_s:.1f} s "
              f"({entries / build_s:,.0f} entries/s)")
        print(f"model saved in Redis: {saved['kairos_model_save_bytes'] / 1e6:,.1f} MB in "
              f"{saved['kairos_model_save_ms']:,.0f} ms; the next replica started from it "
              f"({restored:,.0f} entries) in {restore_s:.1f} s")
        print(f"cached run: {hits:,.0f} hits, {misses:,.0f} misses "
              f"(hit ratio {hits / max(hits + misses, 1):.3f})\n")
        print("| server | max req/s | p50 at 2,000 req/s | p99 at 2,000 req/s |")
        print("|---|---|---|---|")
        for what, rps, p50, p99 in rows:
            print(f"| {what} | {rps:,.0f} | {p50 / 1000:.2f} ms | {p99 / 1000:.2f} ms |")
    finally:
        stop(children)
        stop(backends)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

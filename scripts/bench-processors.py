#!/usr/bin/env python3
"""Throughput of `kairos process` replicas on one machine: 1, 2 and 4 replicas sharing a
four-partition topic (docs/SCALING.md, "Processor replicas: measured").

It starts its own tansu broker (scripts/fetch-tansu.sh) and redis-server on free loopback ports,
fills a topic with `kairos bench --quick --scenario ingest` (the bench's realistic events, through
a `kairos serve` child on that topic), then for each replica count starts that many
`kairos process` replicas at once in a fresh consumer group, with a fresh Redis key prefix, and
reads their /metrics every 100 ms:

- settled: when the group has given out every partition for the last time;
- applied: the events the replicas applied (kairos_group_events_applied_total, summed), and when
  the sum stopped growing;
- the rate: events applied after the group settled, over the time from settling to the last one.

Usage: cargo build --release && python3 scripts/bench-processors.py [--counts 1,2,4] [--fills 3]
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

from benchlib import (base_env, check_binaries, fill_topic, metrics, start_backends,
                      start_kairos, stop)

PARTITIONS = 4


def run(count, shared_env, work):
    env = dict(shared_env)
    env["KAIROS_KAFKA__GROUP"] = f"scale-{count}-{os.getpid()}"
    env["KAIROS_REDIS__PREFIX"] = f"scale{count}"
    started = time.time()
    replicas = [
        start_kairos("process", env, os.path.join(work, f"p{count}-{i}")) for i in range(count)
    ]
    owned_last, settled, applied_at_settle = None, None, 0.0
    applied, last_change, last_applied = 0.0, started, -1.0
    try:
        while True:
            time.sleep(0.1)
            now = time.time()
            ms = [metrics(addr) for _, addr in replicas]
            owned = tuple(int(m.get("kairos_group_partitions_owned", -1)) for m in ms)
            applied = sum(m.get("kairos_group_events_applied_total", 0.0) for m in ms)
            if owned != owned_last:
                owned_last = owned
                if sum(owned) == PARTITIONS and min(owned) > 0:
                    settled, applied_at_settle = now, applied
                else:
                    settled = None
            if applied != last_applied:
                last_applied, last_change = applied, now
            if settled and now - last_change > 3.0 and applied > 0:
                break
            if now - started > 600:
                sys.exit(f"{count} replicas: no end after 10 minutes")
    finally:
        stop([child for child, _ in replicas])
    events = applied - applied_at_settle
    seconds = max(last_change - settled, 1e-9)
    return {
        "replicas": count,
        "settled_s": settled - started,
        "applied": applied,
        "after_settle": events,
        "seconds": seconds,
        "rate": events / seconds,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1,2,4")
    parser.add_argument("--fills", type=int, default=3,
                        help="runs of the quick ingest scenario that fill the topic")
    parser.add_argument("--no-model", action="store_true",
                        help="replicas publish no model updates (kafka.model_topic = \"\")")
    args = parser.parse_args()
    check_binaries()
    work = tempfile.mkdtemp(prefix="kairos-scale-")
    backends, kafka_port, redis_port = start_backends(work)
    try:
        env = base_env(kafka_port, redis_port, "kairos-scale", PARTITIONS)
        if args.no_model:
            env["KAIROS_KAFKA__MODEL_TOPIC"] = ""
        fill_topic(env, work, args.fills)
        print("| replicas | group settled after | events applied | after settling | in | events/s |")
        print("|---|---|---|---|---|---|")
        for count in [int(c) for c in args.counts.split(",")]:
            r = run(count, env, work)
            print(f"| {r['replicas']} | {r['settled_s']:.1f} s | {r['applied']:,.0f} | "
                  f"{r['after_settle']:,.0f} | {r['seconds']:.1f} s | {r['rate']:,.0f} |",
                  flush=True)
    finally:
        stop(backends)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

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
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KAIROS = os.path.join(ROOT, "target", "release", "kairos")
TANSU = os.path.join(ROOT, "target", "tools", "tansu", "tansu")
PARTITIONS = 4


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, what, limit=30):
    deadline = time.time() + limit
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"{what} did not listen on {port}")


def metrics(addr):
    try:
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(kairos_[a-z_]+) ([0-9.e+-]+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def start_replica(env, data_dir):
    child = subprocess.Popen(
        [KAIROS, "process", "--listen", "127.0.0.1:0", "--data-dir", data_dir],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    for line in child.stdout:
        if line.startswith("kairos listening on http://"):
            return child, line.strip().removeprefix("kairos listening on http://")
    sys.exit("kairos process exited before listening")


def run(count, base_env, work):
    env = dict(base_env)
    env["KAIROS_KAFKA__GROUP"] = f"scale-{count}-{os.getpid()}"
    env["KAIROS_REDIS__PREFIX"] = f"scale{count}"
    started = time.time()
    replicas = [
        start_replica(env, os.path.join(work, f"p{count}-{i}")) for i in range(count)
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
        for child, _ in replicas:
            child.terminate()
        for child, _ in replicas:
            child.wait()
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
    args = parser.parse_args()
    for path, hint in [(KAIROS, "cargo build --release"), (TANSU, "scripts/fetch-tansu.sh")]:
        if not os.path.exists(path):
            sys.exit(f"{path} is missing: run {hint}")
    work = tempfile.mkdtemp(prefix="kairos-scale-")
    kafka_port, redis_port = free_port(), free_port()
    broker = subprocess.Popen(
        [TANSU, "broker", "--listener-url", f"tcp://127.0.0.1:{kafka_port}",
         "--advertised-listener-url", f"tcp://127.0.0.1:{kafka_port}",
         "--storage-engine", "memory://tansu/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    redis = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", work],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(kafka_port, "tansu")
        wait_port(redis_port, "redis-server")
        env = {k: v for k, v in os.environ.items() if not k.startswith("KAIROS_")}
        env.update({
            "KAIROS_LOG": f"kafka://127.0.0.1:{kafka_port}",
            "KAIROS_STATE": f"redis://127.0.0.1:{redis_port}",
            "KAIROS_KAFKA__TOPIC": "kairos-scale",
            "KAIROS_KAFKA__PARTITIONS": str(PARTITIONS),
            "KAIROS_LOG_LEVEL": "warn",
        })
        fill_env = dict(env)
        del fill_env["KAIROS_STATE"]
        for n in range(args.fills):
            print(f"filling the topic ({n + 1}/{args.fills}): kairos bench --quick --scenario ingest",
                  file=sys.stderr)
            subprocess.run([KAIROS, "bench", "--quick", "--scenario", "ingest", "--seed", str(n + 1),
                            "--dir", os.path.join(work, f"fill{n}")],
                           env=fill_env, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        print("| replicas | group settled after | events applied | after settling | in | events/s |")
        print("|---|---|---|---|---|---|")
        for count in [int(c) for c in args.counts.split(",")]:
            r = run(count, env, work)
            print(f"| {r['replicas']} | {r['settled_s']:.1f} s | {r['applied']:,.0f} | "
                  f"{r['after_settle']:,.0f} | {r['seconds']:.1f} s | {r['rate']:,.0f} |",
                  flush=True)
    finally:
        broker.terminate()
        redis.terminate()
        broker.wait()
        redis.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Shared pieces of the scale-out benchmark scripts (bench-processors.py, bench-api.py): a tansu
broker and a redis-server of their own on free loopback ports, `kairos` children, and /metrics."""

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KAIROS = os.path.join(ROOT, "target", "release", "kairos")
TANSU = os.path.join(ROOT, "target", "tools", "tansu", "tansu")


def check_binaries():
    for path, hint in [(KAIROS, "cargo build --release"), (TANSU, "scripts/fetch-tansu.sh")]:
        if not os.path.exists(path):
            sys.exit(f"{path} is missing: run {hint}")


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
    """The unlabelled kairos_* samples of a node's /metrics ({} if it does not answer)."""
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


def start_backends(work):
    """A tansu broker (memory storage) and a redis-server (no persistence): (processes, kafka
    port, redis port)."""
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
    wait_port(kafka_port, "tansu")
    wait_port(redis_port, "redis-server")
    return [broker, redis], kafka_port, redis_port


def base_env(kafka_port, redis_port, topic, partitions):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAIROS_")}
    env.update({
        "KAIROS_LOG": f"kafka://127.0.0.1:{kafka_port}",
        "KAIROS_STATE": f"redis://127.0.0.1:{redis_port}",
        "KAIROS_KAFKA__TOPIC": topic,
        "KAIROS_KAFKA__MODEL_TOPIC": f"{topic}-model",
        "KAIROS_KAFKA__PARTITIONS": str(partitions),
        "KAIROS_LOG_LEVEL": "warn",
    })
    return env


def fill_topic(env, work, fills):
    """Fills the topic with `fills` runs of `kairos bench --quick --scenario ingest` (a serve
    node on the topic, without Redis)."""
    fill_env = dict(env)
    del fill_env["KAIROS_STATE"]
    for n in range(fills):
        print(f"filling the topic ({n + 1}/{fills}): kairos bench --quick --scenario ingest",
              file=sys.stderr)
        subprocess.run([KAIROS, "bench", "--quick", "--scenario", "ingest", "--seed", str(n + 1),
                        "--dir", os.path.join(work, f"fill{n}")],
                       env=fill_env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


def start_kairos(role, env, data_dir):
    """A `kairos <role>` child: (process, HOST:PORT) once it listens."""
    os.makedirs(data_dir, exist_ok=True)
    child = subprocess.Popen(
        [KAIROS, role, "--listen", "127.0.0.1:0", "--data-dir", data_dir],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    for line in child.stdout:
        if line.startswith("kairos listening on http://"):
            return child, line.strip().removeprefix("kairos listening on http://")
    sys.exit(f"kairos {role} exited before listening")


def stop(children):
    for child in children:
        child.terminate()
    for child in children:
        child.wait()


def wait_ready(addr, what, limit=600):
    deadline = time.time() + limit
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://{addr}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"{what} never became ready")

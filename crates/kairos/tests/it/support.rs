//! Test support: temporary nodes, in-process requests, and a minimal HTTP/1.1 client for child
//! processes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use serde_json::Value;
use tower::ServiceExt;

use kairos::config::{self, Config};
use kairos::node::Node;

/// Makes the child of `cmd` die with the test that starts it. Servers are stopped when their
/// guards drop, but a test binary killed by a signal (a timeout, ^C) drops nothing, and its
/// brokers and Redis servers would outlive it. The kernel sends the signal when the *thread*
/// that started the child ends: every test starts its servers on its own thread.
pub fn dies_with_test(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: runs in the forked child before exec; prctl(2) is async-signal-safe and nothing
    // here allocates.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kairos-it-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The default configuration on `data_dir`, with `overrides` (TOML) applied.
pub fn test_config(data_dir: &Path, overrides: &str) -> Config {
    let mut flags: toml::Table = toml::from_str(overrides).unwrap();
    flags.insert(
        "data_dir".into(),
        toml::Value::String(data_dir.display().to_string()),
    );
    // Recompute cached lists on every change so results never depend on wall-clock timing.
    let model = flags
        .entry("model")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .unwrap();
    model
        .entry("trending_refresh_ms")
        .or_insert(toml::Value::Integer(0));
    // Reads wait for everything acknowledged before them, not only their person's events, so
    // that answers never depend on how far the processor got with other people's events.
    let api = flags
        .entry("api")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .unwrap();
    api.entry("read_others_writes_timeout_ms")
        .or_insert(toml::Value::Integer(60_000));
    config::load(None, std::iter::empty(), flags).unwrap()
}

/// A `kairos` child process (`serve`, `ingest`) on a free port, ready to take requests.
pub struct Server {
    pub child: Child,
    pub addr: String,
}

impl Server {
    /// Runs `kairos <command>` on `data_dir` with `env` (`KAIROS_*` settings) and waits until it
    /// reports ready. Snapshots every second, so that a kill finds one recent.
    pub fn start(command: &str, data_dir: &Path, env: &[(String, String)]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kairos"));
        // The test suite's own settings (`KAIROS_TEST_*`) are not the child's configuration,
        // which would refuse them as unknown keys.
        for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("KAIROS_TEST_")) {
            cmd.env_remove(name);
        }
        let mut child = dies_with_test(&mut cmd)
            .args([command, "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env("KAIROS_LOG_LEVEL", "warn")
            .env("KAIROS_PROCESSOR__SNAPSHOT_INTERVAL_SECS", "1")
            .envs(env.iter().cloned())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start kairos");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("kairos exited before listening")
                .unwrap();
            if let Some(rest) = line.strip_prefix("kairos listening on http://") {
                break rest.trim().to_owned();
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = http(&addr, "GET", "/readyz", None, Duration::from_secs(2)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "kairos {command} never became ready"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Server { child, addr }
    }
}

/// Killed if the test did not stop it, so that a failing test leaves no process behind.
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tansu broker (the Kafka protocol, memory storage unless told otherwise) on a free loopback
/// port; killed on drop.
pub struct KafkaBroker {
    child: Child,
    pub addr: String,
    launch: Box<BrokerLaunch>,
}

/// What a broker is started with, kept so that it can be started again the same way.
#[derive(Clone)]
struct BrokerLaunch {
    bin: PathBuf,
    storage: String,
    /// The working directory, which relative `sqlite://` paths are relative to.
    dir: Option<PathBuf>,
    /// The port the broker tells clients to connect to, when not its own (a TLS proxy's).
    advertised_port: Option<u16>,
    /// More arguments to `tansu broker`.
    args: Vec<String>,
}

impl BrokerLaunch {
    /// The suite's tansu on `storage`.
    fn on(storage: &str) -> BrokerLaunch {
        BrokerLaunch {
            bin: tansu_binary(),
            storage: storage.to_owned(),
            dir: None,
            advertised_port: None,
            args: Vec::new(),
        }
    }

    /// The durable tansu build on SQLite, its database in `dir`.
    fn sqlite_in(dir: &Path) -> BrokerLaunch {
        BrokerLaunch {
            bin: durable_tansu_binary(),
            storage: "sqlite://tansu.db".into(),
            dir: Some(dir.to_owned()),
            advertised_port: None,
            args: Vec::new(),
        }
    }
}

impl KafkaBroker {
    pub fn start() -> KafkaBroker {
        Self::launch(BrokerLaunch::on("memory://tansu/"))
    }

    /// A broker (memory storage) that tells clients to connect to `port`, where a [`TlsProxy`]
    /// in front of it listens.
    pub fn start_advertising(port: u16) -> KafkaBroker {
        Self::launch(BrokerLaunch {
            advertised_port: Some(port),
            ..BrokerLaunch::on("memory://tansu/")
        })
    }

    /// A broker that requires SASL (SCRAM-SHA-512) of its clients, knowing one `user` with
    /// `password`, and tells them to connect to `port` (a [`TlsProxy`]'s). tansu creates users
    /// only while authentication is off, so the durable build (SQLite storage in `dir`) is
    /// started without it, given the user, and started again with it.
    pub fn start_sasl(dir: &Path, port: u16, user: &str, password: &str) -> KafkaBroker {
        let mut launch = BrokerLaunch {
            advertised_port: Some(port),
            ..BrokerLaunch::sqlite_in(dir)
        };
        let mut broker = Self::launch(launch.clone());
        let created = Command::new(&launch.bin)
            .args(["user", "create", "--mechanism", "scram512", "--broker"])
            .arg(format!("tcp://{}", broker.addr))
            .args([user, password])
            .output()
            .unwrap();
        assert!(
            created.status.success(),
            "tansu user create: {}",
            String::from_utf8_lossy(&created.stderr)
        );
        launch.args.push("--authentication".into());
        broker.launch = Box::new(launch);
        broker.restart();
        broker
    }

    /// A broker that keeps what it acknowledged across a crash: the durable tansu build
    /// (scripts/fetch-tansu.sh) on its SQLite storage engine, in a database file in `dir`.
    /// `KAIROS_TEST_DURABLE_BROKER` names another storage engine instead, such as
    /// `postgres://…`, for the tansu named by `KAIROS_TEST_TANSU`.
    pub fn start_durable(dir: &Path) -> KafkaBroker {
        Self::launch(match std::env::var("KAIROS_TEST_DURABLE_BROKER") {
            Ok(storage) => BrokerLaunch::on(&storage),
            Err(_) => BrokerLaunch::sqlite_in(dir),
        })
    }

    fn launch(launch: BrokerLaunch) -> KafkaBroker {
        for _ in 0..5 {
            if let Some(broker) = Self::try_start_on(free_port(), &launch) {
                return broker;
            }
        }
        panic!("tansu did not start on a free port in five tries");
    }

    /// Kills the broker with SIGKILL and starts it again on the same port and storage.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let port: u16 = self.addr.rsplit(':').next().unwrap().parse().unwrap();
        for _ in 0..50 {
            if let Some(again) = Self::try_start_on(port, &self.launch) {
                *self = again;
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("tansu did not start again on port {port}");
    }

    fn try_start_on(port: u16, launch: &BrokerLaunch) -> Option<KafkaBroker> {
        let bin = &launch.bin;
        {
            let addr = format!("127.0.0.1:{port}");
            let url = format!("tcp://{addr}");
            let advertised = format!("tcp://127.0.0.1:{}", launch.advertised_port.unwrap_or(port));
            let mut cmd = Command::new(bin);
            if let Some(dir) = &launch.dir {
                cmd.current_dir(dir);
            }
            let mut child = dies_with_test(&mut cmd)
                .args(["broker", "--listener-url", &url])
                .args(["--advertised-listener-url", &advertised])
                .args(["--storage-engine", &launch.storage])
                .args(&launch.args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
            // tansu exits (with status 0) when its port is taken: it must still run once the
            // port answers, or another process answered.
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
                if TcpStream::connect(&addr).is_ok() {
                    std::thread::sleep(Duration::from_millis(50));
                    if child.try_wait().unwrap().is_none() {
                        return Some(KafkaBroker {
                            child,
                            addr,
                            launch: Box::new(launch.clone()),
                        });
                    }
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        None
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// TLS in front of a plaintext server: `socat` (Debian's) terminating TLS on a loopback port with
/// a self-signed certificate for 127.0.0.1 made by `openssl` (Debian's) for the test, and
/// forwarding to the server's port; killed on drop. tansu 0.6 cannot serve TLS itself (its
/// `--cert` and `--key` flags exclude each other), so the Kafka TLS test puts this in front of it.
pub struct TlsProxy {
    child: Child,
    pub port: u16,
    /// The certificate, which a client trusts as its CA.
    pub ca: PathBuf,
    _cert: SelfSigned,
}

/// A self-signed certificate for 127.0.0.1 and its key, made by `openssl` (Debian's) for the test.
pub struct SelfSigned {
    pub cert: PathBuf,
    pub key: PathBuf,
    _dir: TempDir,
}

impl SelfSigned {
    pub fn new() -> SelfSigned {
        let dir = TempDir::new("tls");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let made = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args([
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("the TLS tests need openssl (Debian's package)");
        assert!(
            made.status.success(),
            "openssl: {}",
            String::from_utf8_lossy(&made.stderr)
        );
        SelfSigned {
            cert,
            key,
            _dir: dir,
        }
    }
}

impl TlsProxy {
    /// A proxy on `port` forwarding to `target` (HOST:PORT).
    pub fn start(port: u16, target: &str) -> TlsProxy {
        let tls = SelfSigned::new();
        let listen = format!(
            "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,verify=0,cert={},key={}",
            tls.cert.display(),
            tls.key.display()
        );
        let mut child = dies_with_test(&mut Command::new("socat"))
            .arg(listen)
            .arg(format!("TCP:{target}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the TLS tests need socat (Debian's package; scripts/test.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                child.try_wait().unwrap().is_none(),
                "socat exited: port {port} taken?"
            );
            assert!(Instant::now() < deadline, "socat never listened on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        TlsProxy {
            child,
            port,
            ca: tls.cert.clone(),
            _cert: tls,
        }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The tansu binary: `KAIROS_TEST_TANSU`, else where scripts/fetch-tansu.sh puts it.
fn tansu_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("KAIROS_TEST_TANSU") {
        return p.into();
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/tools/tansu/tansu");
    assert!(
        p.exists(),
        "the Kafka tests need a tansu broker at {}: run scripts/fetch-tansu.sh (scripts/test.sh does)",
        p.display()
    );
    p
}

/// The tansu built with durable (SQLite) storage: `KAIROS_TEST_TANSU_DURABLE`, else where
/// `scripts/fetch-tansu.sh --durable` links it.
fn durable_tansu_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("KAIROS_TEST_TANSU_DURABLE") {
        return p.into();
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/tools/tansu-durable/tansu");
    assert!(
        p.exists(),
        "the durable-broker test needs tansu built with SQLite storage at {}: run \
         scripts/fetch-tansu.sh --durable (scripts/test.sh does; the first build takes about ten \
         minutes)",
        p.display()
    );
    p
}

/// A `redis-server` of the test's own on a free loopback port, keeping nothing on disk.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: TempDir,
    mode: RedisMode,
    /// More arguments to `redis-server` (TLS).
    extra: Vec<String>,
}

#[derive(Clone, Copy, PartialEq)]
enum RedisMode {
    /// Nothing on disk.
    Plain,
    /// A cluster node (nothing on disk but its cluster configuration).
    Cluster,
    /// Every write in an append-only file, fsynced before the reply: survives a SIGKILL.
    Durable,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_in(RedisMode::Plain)
    }

    /// A server that keeps every write across a SIGKILL (`appendfsync always`).
    pub fn start_durable() -> RedisServer {
        Self::start_in(RedisMode::Durable)
    }

    fn start_in(mode: RedisMode) -> RedisServer {
        Self::start_with(mode, Vec::new())
    }

    fn start_with(mode: RedisMode, extra: Vec<String>) -> RedisServer {
        let cluster = mode == RedisMode::Cluster;
        for _ in 0..5 {
            // A cluster node also listens on port + 10000 (the cluster bus).
            let port = free_port();
            if cluster
                && (port > 55_000 || TcpListener::bind(("127.0.0.1", port + 10_000)).is_err())
            {
                continue;
            }
            let dir = TempDir::new("redis");
            if let Some(child) = Self::spawn(port, dir.path(), mode, &extra) {
                return RedisServer {
                    child: Some(child),
                    port,
                    dir,
                    mode,
                    extra,
                };
            }
        }
        panic!("redis-server did not start on a free port in five tries");
    }

    fn spawn(port: u16, dir: &Path, mode: RedisMode, extra: &[String]) -> Option<Child> {
        let mut cmd = Command::new("redis-server");
        dies_with_test(&mut cmd)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--protected-mode", "no"])
            .args(extra)
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        match mode {
            RedisMode::Plain => cmd.args(["--appendonly", "no"]),
            RedisMode::Cluster => cmd.args(["--appendonly", "no", "--cluster-enabled", "yes"]),
            RedisMode::Durable => cmd.args(["--appendonly", "yes", "--appendfsync", "always"]),
        };
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "starting redis-server: {e} (scripts/test.sh installs it from Debian's packages)"
            )
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                return None;
            }
            if redis_cli(port, &["PING"]).is_some_and(|r| r.trim() == "PONG") {
                return Some(child);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL) and starts an empty one on the same port (Redis restarted
    /// without persistence).
    pub fn restart_empty(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(self.dir.path());
        std::fs::create_dir_all(self.dir.path()).unwrap();
        self.start_again();
    }

    /// Kills the server with SIGKILL; [`RedisServer::start_again`] brings it back.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on its port and directory (a durable one with its data).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the server is running");
        self.child = Some(
            Self::spawn(self.port, self.dir.path(), self.mode, &self.extra)
                .expect("redis-server restarts on its port"),
        );
    }

    /// Freezes (`true`) or resumes the server with SIGSTOP / SIGCONT: a Redis that stops
    /// answering without closing its connections.
    pub fn freeze(&self, frozen: bool) {
        let signal = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        let pid = self.child.as_ref().expect("the server is running").id();
        // SAFETY: kill(2) on the pid of a child this struct owns and has not reaped.
        let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill({signal})");
    }

    /// Runs a command with redis-cli; its output.
    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, args).unwrap_or_else(|| panic!("redis-cli {args:?} failed"))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn redis_cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A Redis Cluster of three masters of the test's own, every slot assigned.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    /// With TLS: each node's TLS port (its plaintext port serves too).
    tls_ports: Vec<u16>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        Self::start_nodes((0..3).map(|_| (Vec::new(), None)).collect())
    }

    /// A cluster whose nodes also serve TLS with `cert`, on ports of their own, and talk TLS to
    /// each other; each tells a client the ports of its kind of connection.
    pub fn start_tls(cert: &SelfSigned) -> RedisCluster {
        let (cert, key) = (
            cert.cert.display().to_string(),
            cert.key.display().to_string(),
        );
        Self::start_nodes(
            (0..3)
                .map(|_| {
                    let tls_port = free_port();
                    let extra = [
                        "--tls-port",
                        &tls_port.to_string(),
                        "--tls-cluster",
                        "yes",
                        "--tls-cert-file",
                        &cert,
                        "--tls-key-file",
                        &key,
                        "--tls-ca-cert-file",
                        &cert,
                        "--tls-auth-clients",
                        "no",
                    ]
                    .map(String::from)
                    .to_vec();
                    (extra, Some(tls_port))
                })
                .collect(),
        )
    }

    fn start_nodes(nodes: Vec<(Vec<String>, Option<u16>)>) -> RedisCluster {
        let tls_ports = nodes.iter().filter_map(|(_, p)| *p).collect();
        let nodes: Vec<RedisServer> = nodes
            .into_iter()
            .map(|(extra, _)| RedisServer::start_with(RedisMode::Cluster, extra))
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        nodes[0].cli(&args);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !nodes
            .iter()
            .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        {
            assert!(
                Instant::now() < deadline,
                "the cluster did not reach cluster_state:ok"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        RedisCluster { nodes, tls_ports }
    }

    /// The cluster's TLS address (`rediss-cluster://…`; see [`RedisCluster::start_tls`]).
    pub fn tls_url(&self) -> String {
        assert!(!self.tls_ports.is_empty(), "the cluster serves no TLS");
        let addrs: Vec<String> = self
            .tls_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("rediss-cluster://{}", addrs.join(","))
    }

    pub fn url(&self) -> String {
        let addrs: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis-cluster://{}", addrs.join(","))
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Redis of the test's own for the state: one server or a cluster.
pub enum Redis {
    Single(RedisServer),
    Cluster(RedisCluster),
}

impl Redis {
    pub fn url(&self) -> String {
        match self {
            Redis::Single(r) => r.url(),
            Redis::Cluster(c) => c.url(),
        }
    }

    /// A client reading the profiles a node with the default key prefix writes.
    pub fn profiles(&self) -> kairos_state::redis_mirror::RedisProfiles {
        self.profiles_under("kairos")
    }

    /// A client reading the profiles written under `prefix`.
    pub fn profiles_under(&self, prefix: &str) -> kairos_state::redis_mirror::RedisProfiles {
        let settings = kairos_state::RedisSettings {
            prefix: prefix.into(),
            ..Default::default()
        };
        kairos_state::redis_mirror::RedisProfiles::new(&self.url(), settings).unwrap()
    }

    /// Waits until Redis holds exactly what `node`'s state says every profile key holds.
    pub fn assert_holds_the_profiles_of(&self, node: &TestNode) {
        let mut redis = self.profiles_under(&node.config.redis.prefix);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let mismatch = first_mismatch(&mut redis, &node.node().store.read());
            match mismatch {
                None => return,
                Some(key) if Instant::now() > deadline => {
                    panic!("Redis does not hold what the state has for {key:?}")
                }
                Some(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Redis holds, under `prefix`, exactly what `state` says every profile key holds (no
    /// waiting).
    pub fn assert_holds(&self, state: &kairos_state::State, prefix: &str) {
        if let Some(key) = first_mismatch(&mut self.profiles_under(prefix), state) {
            panic!("Redis does not hold what the state has for {key:?}");
        }
    }
}

/// The first profile key (profiles and merged-away anonymous keys) for which Redis does not hold
/// what `state` has; panics if Redis claims a checkpoint the state has not reached.
fn first_mismatch(
    redis: &mut kairos_state::redis_mirror::RedisProfiles,
    state: &kairos_state::State,
) -> Option<String> {
    let keys: Vec<String> = state
        .users
        .keys()
        .chain(state.links.keys().map(AsRef::as_ref))
        .map(str::to_owned)
        .collect();
    if keys.is_empty() {
        return Some("(the state has no profiles yet)".into());
    }
    keys.into_iter().find_map(|key| {
        let expected = state.stored_profile(&key);
        let stored = redis.read(&key).unwrap();
        if let Some((_, fence)) = &stored {
            let ahead = fence
                .iter()
                .zip(state.checkpoint.offsets.iter().chain(std::iter::repeat(&0)))
                .any(|(a, b)| a > b);
            assert!(
                !ahead,
                "{key}: Redis claims a checkpoint the state has not reached"
            );
        }
        (stored.map(|(p, _)| p) != expected).then_some(key)
    })
}

/// Where a test node keeps its event log (and its profiles). The black-box tests run on each.
pub enum Backend {
    Embedded,
    /// A topic with `partitions` partitions on a broker of the test's own, and with `redis`, the
    /// profiles in a Redis of the test's own as well.
    Kafka {
        broker: KafkaBroker,
        partitions: u32,
        redis: Option<Redis>,
    },
}

impl Backend {
    pub fn kafka(partitions: u32) -> Backend {
        Backend::Kafka {
            broker: KafkaBroker::start(),
            partitions,
            redis: None,
        }
    }

    /// The scale-out mode: the log on Kafka, the profiles in Redis.
    pub fn kafka_redis(partitions: u32) -> Backend {
        Backend::Kafka {
            broker: KafkaBroker::start(),
            partitions,
            redis: Some(Redis::Single(RedisServer::start())),
        }
    }

    /// The scale-out mode with the profiles in a Redis Cluster of three masters.
    pub fn kafka_redis_cluster(partitions: u32) -> Backend {
        Backend::Kafka {
            broker: KafkaBroker::start(),
            partitions,
            redis: Some(Redis::Cluster(RedisCluster::start())),
        }
    }

    pub fn redis(&self) -> Option<&Redis> {
        match self {
            Backend::Kafka { redis, .. } => redis.as_ref(),
            Backend::Embedded => None,
        }
    }

    /// The `KAIROS_*` variables that put a `kairos serve` child on `data_dir` on this backend.
    pub fn env(&self, data_dir: &Path) -> Vec<(String, String)> {
        match self {
            Backend::Embedded => Vec::new(),
            Backend::Kafka {
                broker,
                partitions,
                redis,
            } => {
                let mut env = vec![
                    ("KAIROS_LOG".into(), format!("kafka://{}", broker.addr)),
                    ("KAIROS_KAFKA__TOPIC".into(), Self::topic(data_dir)),
                    ("KAIROS_KAFKA__PARTITIONS".into(), partitions.to_string()),
                ];
                if let Some(redis) = redis {
                    env.push(("KAIROS_STATE".into(), redis.url()));
                    env.push(("KAIROS_REDIS__PREFIX".into(), Self::topic(data_dir)));
                }
                env
            }
        }
    }

    /// The topic of a Kafka node on `data_dir`.
    pub fn topic(data_dir: &Path) -> String {
        data_dir.file_name().unwrap().to_string_lossy().into_owned()
    }

    /// `overrides` with the settings that put a node on `data_dir` on this backend. A Kafka node
    /// gets a topic of its own, named after its data directory, so restarts find it again.
    pub fn config(&self, data_dir: &Path, overrides: &str) -> String {
        match self {
            Backend::Embedded => overrides.to_owned(),
            Backend::Kafka {
                broker,
                partitions,
                redis,
            } => {
                let topic = Self::topic(data_dir);
                // With Redis, the node's keys are prefixed by its topic too, so that the nodes
                // of one test sharing a Redis never meet.
                let (state, prefix) = match redis {
                    Some(r) => (
                        format!("state = \"{}\"\n", r.url()),
                        format!("[redis]\nprefix = \"{topic}\"\n"),
                    ),
                    None => Default::default(),
                };
                format!(
                    "log = \"kafka://{}\"\n{state}{overrides}\n[kafka]\ntopic = \"{topic}\"\npartitions = {partitions}\n{prefix}",
                    broker.addr
                )
            }
        }
    }
}

/// A node running in-process on a temporary data directory.
pub struct TestNode {
    pub node: Option<Node>,
    pub router: axum::Router,
    pub config: Config,
}

impl TestNode {
    pub fn start(dir: &Path, overrides: &str) -> TestNode {
        let config = test_config(dir, overrides);
        Self::start_with(config)
    }

    /// A node on `backend`'s event log.
    pub fn start_on(backend: &Backend, dir: &Path, overrides: &str) -> TestNode {
        Self::start(dir, &backend.config(dir, overrides))
    }

    pub fn start_with(config: Config) -> TestNode {
        let node = Node::start(&config).unwrap();
        assert!(
            node.wait_ready(Duration::from_secs(30)),
            "node did not become ready"
        );
        let router = node.router();
        TestNode {
            node: Some(node),
            router,
            config,
        }
    }

    pub fn node(&self) -> &Node {
        self.node.as_ref().unwrap()
    }

    pub async fn request(
        &self,
        method: Method,
        uri: &str,
        body: Option<Vec<u8>>,
        content_type: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let req = req
            .body(body.map(Body::from).unwrap_or_else(Body::empty))
            .unwrap();
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, value)
    }

    pub async fn post(&self, uri: &str, body: &Value) -> (StatusCode, Value) {
        self.request(
            Method::POST,
            uri,
            Some(serde_json::to_vec(body).unwrap()),
            Some("application/json"),
        )
        .await
    }

    pub async fn put(&self, uri: &str, body: &Value) -> (StatusCode, Value) {
        self.request(
            Method::PUT,
            uri,
            Some(serde_json::to_vec(body).unwrap()),
            Some("application/json"),
        )
        .await
    }

    pub async fn get(&self, uri: &str) -> (StatusCode, Value) {
        self.request(Method::GET, uri, None, None).await
    }

    pub async fn delete(&self, uri: &str) -> (StatusCode, Value) {
        self.request(Method::DELETE, uri, None, None).await
    }

    /// Graceful shutdown: final snapshot, log closed.
    pub fn shutdown(mut self) {
        self.node.take().unwrap().shutdown().unwrap();
    }
}

/// Item ids of a recommendation response.
pub fn ids(rec: &Value) -> Vec<String> {
    rec["items"]
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect()
}

/// A blocking HTTP/1.1 request to a child process; returns status and body.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let body = body.unwrap_or(b"");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf)?;
    let text_end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no header end"))?;
    let head = String::from_utf8_lossy(&buf[..text_end]).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad status line"))?;
    let mut body = buf[text_end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Ok((status, body))
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(pos) = data.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&data[..pos]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = pos + 2;
        out.extend_from_slice(&data[start..(start + size).min(data.len())]);
        data = &data[(start + size + 2).min(data.len())..];
    }
    out
}

/// A scale-out deployment's shared settings, for `kairos ingest|process|api|serve` children: a
/// topic of `partitions` partitions on `broker` named after `root` (with its model topic and
/// consumer group named after it too), and the data directory of each child under `root`.
pub struct ScaleOut {
    pub topic: String,
    pub env: Vec<(String, String)>,
    root: PathBuf,
}

impl ScaleOut {
    pub fn new(broker: &KafkaBroker, root: &TempDir, partitions: u32) -> ScaleOut {
        let topic = root
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let env = [
            ("KAIROS_LOG", format!("kafka://{}", broker.addr)),
            ("KAIROS_KAFKA__TOPIC", topic.clone()),
            ("KAIROS_KAFKA__MODEL_TOPIC", format!("{topic}-model")),
            ("KAIROS_KAFKA__PARTITIONS", partitions.to_string()),
            ("KAIROS_KAFKA__GROUP", format!("{topic}-processors")),
            ("KAIROS_KAFKA__GROUP_SESSION_TIMEOUT_MS", "6000".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        ScaleOut {
            topic,
            env,
            root: root.path().to_owned(),
        }
    }

    /// The settings plus the profiles in `redis`, under a key prefix named after the topic.
    pub fn with_redis(&self, redis: &Redis) -> Vec<(String, String)> {
        let mut env = self.env.clone();
        env.push(("KAIROS_STATE".into(), redis.url()));
        env.push(("KAIROS_REDIS__PREFIX".into(), self.topic.clone()));
        env
    }

    /// A fresh data directory for the child `name`.
    pub fn dir(&self, name: &str) -> PathBuf {
        let d = self.root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}

/// Asserts that two states hold the same: checkpoint, counters, clock, items, profiles, links and
/// session model.
pub fn assert_states_equal(a: &kairos_state::State, b: &kairos_state::State) {
    assert_eq!(a.checkpoint, b.checkpoint);
    assert_eq!(a.counters, b.counters);
    assert_eq!(a.clock, b.clock);
    assert_eq!(a.items.len(), b.items.len());
    for i in 0..a.items.len() as u32 {
        assert_eq!(a.items.name(i), b.items.name(i));
    }
    assert!(a.item_data == b.item_data, "item state differs");
    assert_eq!(a.users.len(), b.users.len());
    for (k, p) in &a.users {
        assert_eq!(Some(p), b.users.get(k), "profile {k} differs");
    }
    assert_eq!(a.links, b.links);
    assert!(a.sessions == b.sessions, "session model differs");
}

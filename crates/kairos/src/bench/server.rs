//! The `kairos serve` child the benchmark drives.
//!
//! The benchmark measures the real server, not an in-process shortcut: the same binary
//! (`std::env::current_exe()`) runs `serve` on a fresh data directory and a free loopback port
//! (`--listen 127.0.0.1:0`; the child prints the address it bound on stdout). Its log lines go to a
//! file next to the data directory so they never mix with the benchmark's progress output. Memory
//! is the child's resident set size from `/proc/<pid>/status`.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `kairos serve` child.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub log_path: PathBuf,
}

/// How the child is started: the binary, an optional configuration file and extra `KAIROS_*`
/// variables.
#[derive(Clone, Debug)]
pub struct Launch {
    pub exe: PathBuf,
    pub config: Option<PathBuf>,
    pub env: Vec<(String, String)>,
}

impl Server {
    /// Starts `kairos serve` on `data_dir` and waits until it listens (not until it is ready).
    pub fn start(launch: &Launch, data_dir: &Path, log_path: &Path) -> Result<Server, String> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(|e| format!("creating {}: {e}", log_path.display()))?;
        let mut cmd = Command::new(&launch.exe);
        if let Some(config) = &launch.config {
            cmd.arg("--config").arg(config);
        }
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env_remove("KAIROS_LISTEN")
            .env_remove("KAIROS_DATA_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        for (k, v) in &launch.env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting {} serve: {e}", launch.exe.display()))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(rest) = line.strip_prefix("kairos listening on http://") {
                        break rest.trim().parse::<SocketAddr>().map_err(|e| {
                            format!("kairos serve printed a bad address {rest:?}: {e}")
                        })?;
                    }
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "kairos serve exited before listening; see {}",
                        log_path.display()
                    ));
                }
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(Server {
            child,
            addr,
            log_path: log_path.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Polls `/readyz` until it answers 200; returns how long that took.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        loop {
            if let Ok((200, _)) = blocking_get(self.addr, "/readyz") {
                return Ok(started.elapsed());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "kairos serve exited ({status}) before it was ready; see {}",
                    self.log_path.display()
                ));
            }
            if started.elapsed() > timeout {
                return Err(format!(
                    "kairos serve was not ready after {timeout:?}; see {}",
                    self.log_path.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Resident set size of the child in bytes.
    pub fn rss_bytes(&self) -> Result<u64, String> {
        rss_bytes(self.pid())
    }

    /// Graceful stop (SIGTERM): the child drains, applies everything, snapshots and exits.
    pub fn terminate(mut self) -> Result<(), String> {
        self.signal(libc::SIGTERM);
        let status = self
            .child
            .wait()
            .map_err(|e| format!("waiting for kairos serve: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!(
                "kairos serve did not shut down cleanly ({status}); see {}",
                self.log_path.display()
            ))
        }
    }

    /// A crash: SIGKILL, no shutdown work at all.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn signal(&self, signal: libc::c_int) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `VmRSS` of process `pid`, in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64, String> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
    parse_vm_rss(&status).ok_or_else(|| format!("no VmRSS in {path}"))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A one-off blocking `GET` (connection closed after it), for control requests outside the load
/// generator: readiness and metrics.
pub fn blocking_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of headers"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad status line"))?;
    Ok((status, body.to_owned()))
}

/// The value of an unlabelled metric in a Prometheus text exposition.
pub fn metric(exposition: &str, name: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rss_and_metrics() {
        let status = "Name:\tkairos\nVmPeak:\t  100 kB\nVmRSS:\t   2048 kB\nThreads: 4\n";
        assert_eq!(parse_vm_rss(status), Some(2048 * 1024));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
        let text = "# HELP kairos_log_bytes x\nkairos_log_bytes 123\nkairos_log_bytes_total 9\nkairos_state_users 4e3\n";
        assert_eq!(metric(text, "kairos_log_bytes"), Some(123.0));
        assert_eq!(metric(text, "kairos_state_users"), Some(4000.0));
        assert_eq!(metric(text, "kairos_missing"), None);
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
    }
}

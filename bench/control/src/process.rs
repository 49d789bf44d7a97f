//! A real `malla control` process over a temporary data directory, on ports picked free on
//! loopback; killed when dropped. Its clients speak TLS, verified with the trust bundle it
//! keeps in its data directory, and prove the operator with its token (it serves no
//! plaintext, and its writes need a credential).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{bail, Context as _};
use malla_tests::control::{
    api::{self, Api},
    tls, TempDir,
};

pub struct ControlProcess {
    child: Child,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub dns: SocketAddr,
    // Dropped after the process is killed.
    dir: TempDir,
}

impl Drop for ControlProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port free a moment ago on 127.0.0.1, for TCP and UDP both (DNS needs the two).
fn free_addr() -> anyhow::Result<SocketAddr> {
    for _ in 0..100 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = tcp.local_addr()?;
        if std::net::UdpSocket::bind(addr).is_ok() {
            return Ok(addr);
        }
    }
    bail!("no free port on 127.0.0.1")
}

impl ControlProcess {
    /// Starts `malla control` and waits until its HTTP API is ready.
    pub async fn start(malla: &Path) -> anyhow::Result<ControlProcess> {
        for _attempt in 0..5 {
            let dir = TempDir::new("bench-control");
            let (http, grpc, dns) = (free_addr()?, free_addr()?, free_addr()?);
            let child = Command::new(malla)
                .arg("control")
                .arg("--data-dir")
                .arg(dir.path())
                .args(["--http-addr", &http.to_string()])
                .args(["--grpc-addr", &grpc.to_string()])
                .args(["--dns-addr", &dns.to_string()])
                .args(["--log", "warn"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("cannot start {}", malla.display()))?;
            let mut process = ControlProcess {
                child,
                http,
                grpc,
                dns,
                dir,
            };
            for _ in 0..500 {
                let ready = process
                    .api()
                    .try_request(http::Method::GET, "/ready", bytes::Bytes::new())
                    .await
                    .is_ok_and(|r| r.status == 200);
                if ready {
                    return Ok(process);
                }
                if process.child.try_wait()?.is_some() {
                    break; // a port was taken meanwhile: try others
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        bail!("malla control did not become ready (see its log above)")
    }

    /// The HTTP API, over TLS with the trust bundle and the operator token the process
    /// wrote in its data directory.
    pub fn api(&self) -> Api {
        Api::new(self.http).with_credentials_of(self.dir.path())
    }

    /// `DATA_DIR/trust-bundle.pem`: what its TLS is verified with.
    pub fn trust_bundle(&self) -> PathBuf {
        tls::bundle_path(self.dir.path())
    }

    /// The operator token it wrote in its data directory.
    pub fn operator_token(&self) -> anyhow::Result<String> {
        api::operator_token(self.dir.path()).context("no operator token in the data directory")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `VmRSS` and `VmHWM` (peak) in bytes, from /proc/PID/status.
    pub fn rss(&self) -> anyhow::Result<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            let line = status
                .lines()
                .find(|l| l.starts_with(name))
                .with_context(|| format!("no {name} in /proc/PID/status"))?;
            let kb: u64 = line
                .split_whitespace()
                .nth(1)
                .context("malformed /proc/PID/status")?
                .parse()?;
            Ok(kb * 1024)
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }
}

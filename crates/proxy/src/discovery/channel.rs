//! The connections to the control plane: TLS 1.3 (rustls on aws-lc-rs, ALPN `h2`) to a
//! server that must prove the control plane's identity (`spiffe://DOMAIN/control`,
//! [`tls::control_plane_client_config`]), or plaintext with an `http://` URL.
//!
//! # Roots
//!
//! The control plane is verified with the trust bundle of this sidecar's certificate once
//! it holds one: the bundle comes with every certificate, so it follows the CA's root
//! rotations. Before that, with the roots of `control.ca_file` (the control plane's
//! `DATA_DIR/trust-bundle.pem`), else with the bundle a certificate kept in
//! `control.identity_dir` came with. Each connection reads them when it is made.
//!
//! # Why two channels
//!
//! A TLS connection presents the client certificate it was made with for its whole life,
//! so one made before the first certificate never authenticates anything. What needs no
//! credential (the first `Certify`, whose join token is the credential; watches) goes on
//! [`Channels::reads`], made at once. What the control plane accepts only from a
//! certificate of this sidecar's service (`Register`, `Heartbeat`, `Deregister`,
//! `ReportEvents`, and renewals) goes on [`Channels::writes`]: a channel per certificate, whose connection waits
//! for the first one and presents the one it was made for; a renewal makes the next call
//! use a new channel, and the old connection closes once its last call is done. Both
//! present the current certificate when they connect, if there is one.
//!
//! A sidecar with no identity configured (no join token, no `identity_dir`) has one
//! channel and no certificate: the control plane will refuse its writes, and the
//! registration and the events say to give it a join token.

use std::{
    future::Future,
    io,
    path::PathBuf,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use serde_json::json;
use tokio::{net::TcpStream, time::timeout};
use tokio_rustls::{client::TlsStream, TlsConnector};
use tonic::{codegen::Service, transport::Channel, transport::Endpoint};
use tracing::{debug, warn};

use super::{get_error, set_error, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, USER_AGENT};
use crate::{
    config::{ControlPlaneConfig, ControlTarget},
    identity::{IdentityState, Svid},
    tls::{self, Expected},
};

/// Longest a TLS handshake with the control plane may take, once TCP is connected.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The ALPN protocol offered: gRPC is HTTP/2.
const ALPN_H2: &[u8] = b"h2";

/// What verifies the control plane and what this sidecar presents to it; the `tls` part
/// of `/config`'s `control`.
pub(crate) struct ControlTls {
    target: ControlTarget,
    connect_timeout: Duration,
    /// `control.ca_file` and its roots, read at start.
    ca_file: Option<(PathBuf, Arc<RootCertStore>)>,
    /// The trust bundle kept with a certificate in `control.identity_dir`.
    kept_bundle: Option<PathBuf>,
    identity: Option<Arc<IdentityState>>,
    handshakes: AtomicU64,
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// Where the roots of the next connection come from.
enum Roots<'a> {
    /// The trust bundle of this sidecar's certificate.
    Certificate(Arc<Svid>),
    CaFile(&'a PathBuf, &'a Arc<RootCertStore>),
    IdentityDir(&'a PathBuf),
    None,
}

impl Roots<'_> {
    fn name(&self) -> Option<&'static str> {
        match self {
            Roots::Certificate(_) => Some("certificate"),
            Roots::CaFile(..) => Some("ca_file"),
            Roots::IdentityDir(_) => Some("identity_dir"),
            Roots::None => None,
        }
    }

    fn describe(&self) -> String {
        match self {
            Roots::Certificate(svid) => format!(
                "the trust bundle of this sidecar's certificate ({} roots)",
                svid.trust_bundle.len()
            ),
            Roots::CaFile(path, _) => format!("control.ca_file {}", path.display()),
            Roots::IdentityDir(path) => format!("the kept trust bundle {}", path.display()),
            Roots::None => "no roots".to_string(),
        }
    }
}

impl ControlTls {
    /// The TLS client of `control`, reached at `target`; reads `control.ca_file` (an
    /// unreadable file, or one that holds no certificate, is an error).
    pub(crate) fn new(
        control: &ControlPlaneConfig,
        target: ControlTarget,
        identity: Option<Arc<IdentityState>>,
    ) -> anyhow::Result<Self> {
        let ca_file = match &control.ca_file {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    anyhow::anyhow!("control.ca_file {}: cannot read: {e}", path.display())
                })?;
                let roots = tls::roots_from_pem(&pem)
                    .map_err(|e| anyhow::anyhow!("control.ca_file {}: {e}", path.display()))?;
                Some((path.clone(), roots))
            }
            None => None,
        };
        Ok(ControlTls {
            target,
            connect_timeout: control.connect_timeout,
            ca_file,
            kept_bundle: control
                .identity_dir
                .as_deref()
                .filter(|_| identity.is_some())
                .map(super::kept_bundle),
            identity,
            handshakes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            last_error: Mutex::new(None),
        })
    }

    fn roots(&self) -> Roots<'_> {
        if let Some(svid) = self.identity.as_ref().and_then(|i| i.current()) {
            return Roots::Certificate(svid);
        }
        if let Some((path, roots)) = &self.ca_file {
            return Roots::CaFile(path, roots);
        }
        match &self.kept_bundle {
            Some(path) => Roots::IdentityDir(path),
            None => Roots::None,
        }
    }

    /// The `tls` part of `/config`'s `control`: the roots the next connection verifies
    /// the control plane with, the certificate it presents, and how connections went.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        let roots = self.roots();
        let file = match &roots {
            Roots::CaFile(path, _) | Roots::IdentityDir(path) => Some(path.display().to_string()),
            _ => None,
        };
        let certificate = self
            .identity
            .as_ref()
            .and_then(|i| i.current())
            .map(|svid| svid.spiffe_id.to_string());
        json!({
            "enabled": true,
            "roots": roots.name(),
            "roots_file": file,
            "roots_description": roots.describe(),
            "client_certificate": certificate,
            "handshakes": self.handshakes.load(Ordering::Relaxed),
            "failures": self.failures.load(Ordering::Relaxed),
            "last_error": get_error(&self.last_error),
        })
    }

    /// A TCP connection and a TLS handshake, recorded.
    async fn connect(&self) -> io::Result<TokioIo<TlsStream<TcpStream>>> {
        match self.handshake().await {
            Ok(stream) => {
                self.handshakes.fetch_add(1, Ordering::Relaxed);
                set_error(&self.last_error, None);
                debug!(control = %self.target.authority, "TLS connection to the control plane");
                Ok(TokioIo::new(stream))
            }
            Err(why) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                // Each reconnection fails the same way: say it once per new reason.
                if get_error(&self.last_error).as_deref() != Some(why.as_str()) {
                    warn!("{why}");
                } else {
                    debug!("{why}");
                }
                set_error(&self.last_error, Some(why.clone()));
                Err(io::Error::other(why))
            }
        }
    }

    async fn handshake(&self) -> Result<TlsStream<TcpStream>, String> {
        let at = &self.target.authority;
        let roots = self.roots();
        let store = match &roots {
            Roots::Certificate(svid) => tls::roots_from_der(&svid.trust_bundle)
                .map_err(|e| format!("this sidecar's trust bundle: {e}"))?,
            Roots::CaFile(_, roots) => Arc::clone(roots),
            Roots::IdentityDir(path) => std::fs::read(path)
                .map_err(|e| e.to_string())
                .and_then(|pem| tls::roots_from_pem(&pem).map_err(|e| e.to_string()))
                .map_err(|e| format!("the kept trust bundle {}: {e}", path.display()))?,
            Roots::None => {
                return Err(format!(
                    "no roots to verify the control plane at {at} with: give control.ca_file \
                     (--control-ca, MALLA_CONTROL_CA), the control plane's DATA_DIR/trust-bundle.pem"
                ))
            }
        };
        let svid = self.identity.as_ref().and_then(|i| i.current());
        let config = tls::control_plane_client_config(store, svid.as_deref(), ALPN_H2)
            .map_err(|e| e.to_string())?;
        let (host, port) = host_port(&self.target);
        let tcp = timeout(self.connect_timeout, TcpStream::connect((host, port)))
            .await
            .map_err(|_| {
                format!(
                    "connecting to the control plane at {at}: no connection within {:?}",
                    self.connect_timeout
                )
            })?
            .map_err(|e| format!("connecting to the control plane at {at}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let connector = TlsConnector::from(Arc::new(config));
        match timeout(HANDSHAKE_TIMEOUT, connector.connect(tls::server_name(), tcp)).await {
            Err(_) => Err(format!(
                "TLS handshake with the control plane at {at}: no answer within {HANDSHAKE_TIMEOUT:?} (does it serve TLS? http://HOST:PORT speaks plaintext)"
            )),
            Ok(Err(e)) => Err(explain(&e, at, &roots)),
            Ok(Ok(stream)) => Ok(stream),
        }
    }
}

/// A failed handshake, with what to check.
fn explain(error: &io::Error, at: &str, roots: &Roots<'_>) -> String {
    let why = tls::explain(error, &Expected::ControlPlane);
    let hint = match (tls::failure_reason(error), roots) {
        ("unknown-ca", Roots::CaFile(..)) => {
            "; control.ca_file must be the trust bundle of this control plane (its DATA_DIR/trust-bundle.pem)"
        }
        ("unknown-ca", _) => "; is it the control plane of this sidecar's mesh?",
        ("protocol", _) => "; does it serve TLS? (http://HOST:PORT speaks plaintext)",
        ("peer-refused", Roots::Certificate(_)) => {
            "; it refused this sidecar's certificate"
        }
        _ => "",
    };
    format!(
        "TLS handshake with the control plane at {at} failed: {why} (verified with {}){hint}",
        roots.describe()
    )
}

/// The host and port to connect to (an IPv6 literal without its brackets).
fn host_port(target: &ControlTarget) -> (String, u16) {
    let (host, port) = target
        .authority
        .rsplit_once(':')
        .unwrap_or((target.authority.as_str(), ""));
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (host.to_string(), port.parse().unwrap_or(7780))
}

/// The connector of a TLS channel: `first_certificate` waits for this sidecar's first
/// certificate before it connects.
#[derive(Clone)]
struct Connect {
    tls: Arc<ControlTls>,
    first_certificate: bool,
}

impl Service<Uri> for Connect {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let Connect {
            tls,
            first_certificate,
        } = self.clone();
        Box::pin(async move {
            if first_certificate {
                if let Some(identity) = &tls.identity {
                    identity.issued().await;
                }
            }
            tls.connect().await
        })
    }
}

/// `malla-proxy/VERSION (sidecar ID)`: the ID, random per process, tells the control plane
/// that this sidecar's connections (reads, and writes with its certificate) are one
/// sidecar's (`malla get proxies` lists it once).
fn user_agent() -> String {
    static ID: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let id = ID.get_or_init(|| fastrand::u64(..));
    format!("{USER_AGENT} (sidecar {id:016x})")
}

/// The channel settings common to both transports.
pub(crate) fn endpoint(control: &ControlPlaneConfig) -> anyhow::Result<Endpoint> {
    let target = control
        .target()
        .map_err(|why| anyhow::anyhow!("control.url {:?}: {why}", control.url))?;
    let endpoint = Endpoint::from_shared(target.uri())?
        .user_agent(user_agent())?
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    // With TLS the connector applies the timeout to TCP alone: the writes' connector
    // waits for the first certificate first, which may take longer.
    Ok(match target.tls {
        true => endpoint,
        false => endpoint.connect_timeout(control.connect_timeout),
    })
}

/// The channels to the control plane (see the module's documentation). Made on the
/// discovery runtime: a channel's connection runs there.
pub(crate) struct Channels {
    reads: Channel,
    writes: Option<Writes>,
}

/// A channel per certificate.
struct Writes {
    endpoint: Endpoint,
    tls: Arc<ControlTls>,
    identity: Arc<IdentityState>,
    /// The channel made for this certificate (`None`: before the first).
    current: Mutex<Option<(Option<Arc<Svid>>, Channel)>>,
}

impl Channels {
    /// `tls`: `None` for plaintext.
    pub(crate) fn new(endpoint: Endpoint, tls: Option<Arc<ControlTls>>) -> Self {
        let Some(tls) = tls else {
            return Channels {
                reads: endpoint.connect_lazy(),
                writes: None,
            };
        };
        let reads = endpoint.connect_with_connector_lazy(Connect {
            tls: tls.clone(),
            first_certificate: false,
        });
        let writes = tls.identity.clone().map(|identity| Writes {
            endpoint,
            tls,
            identity,
            current: Mutex::new(None),
        });
        Channels { reads, writes }
    }

    /// For what needs no credential: the first `Certify` (with a join token), watches.
    pub(crate) fn reads(&self) -> Channel {
        self.reads.clone()
    }

    /// For what the control plane accepts from this sidecar's certificate only (writes of
    /// its instance, events): the channel of the current certificate (its connection waits for the first one).
    pub(crate) fn writes(&self) -> Channel {
        let Some(writes) = &self.writes else {
            return self.reads.clone();
        };
        let svid = writes.identity.current();
        let mut current = writes.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((made_for, channel)) = current.as_ref() {
            let same = match (made_for, &svid) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if same {
                return channel.clone();
            }
        }
        let channel = writes.endpoint.connect_with_connector_lazy(Connect {
            tls: writes.tls.clone(),
            first_certificate: true,
        });
        *current = Some((svid, channel.clone()));
        channel
    }
}

#[cfg(test)]
mod tests;

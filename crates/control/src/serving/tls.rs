//! TLS on the control plane's port: its certificate, the client certificates it accepts,
//! and the trust bundle file clients verify it with.
//!
//! - **Its certificate** is issued by its own CA, like a workload's: the SPIFFE ID
//!   `spiffe://DOMAIN/control` (what sidecars and the CLI check, whatever address they
//!   reach it at), then DNS names and IP addresses (`localhost`, the host name, loopback,
//!   the listening addresses, `--tls-san`) for tools that check a host name (curl,
//!   Prometheus). Its key is made in memory at start and never written. It is renewed at
//!   70 % of its life, and at once when the trust bundle changes (a root rotation), so it
//!   always chains to a root every client trusts.
//! - **Client certificates** are optional: the CLI has none, nor does a sidecar before its
//!   first certificate. One that is presented must chain to the trust bundle (client-auth
//!   usage); the SPIFFE ID in it then names the caller ([`PeerIdentity`]), which the
//!   writes check ([`crate::api::auth`]).
//! - **`DATA_DIR/trust-bundle.pem`** holds every root trusted now, rewritten (temporary
//!   name, then rename) when that changes: what `malla` CLI and a new sidecar are given to
//!   verify the control plane before they hold anything else.
//!
//! TLS 1.3 only, on aws-lc-rs with the hybrid X25519MLKEM768 key exchange preferred, like
//! the sidecars' mTLS. ALPN: `h2`, `http/1.1`; the protocol inside is detected from the
//! first bytes either way.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::SystemTime,
};

use malla_core::SpiffeId;
use rustls::{
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    server::WebPkiClientVerifier,
    RootCertStore, ServerConfig,
};
use tracing::{info, warn};
use x509_parser::prelude::{FromDer as _, X509Certificate};

use crate::{
    identity::{ca::ServerName, Identity, IssueError, Issued},
    store::Store,
};

/// The file, in the data directory, that holds the trust bundle.
pub const TRUST_BUNDLE_FILE: &str = "trust-bundle.pem";

/// Where in its life the control plane's certificate is renewed.
const RENEW_AT: f64 = 0.7;

/// The identity a client proved with its certificate on this connection (`None`: it
/// presented none). In every request's extensions, for both APIs.
#[derive(Clone, Debug, Default)]
pub struct PeerIdentity(pub Option<Arc<SpiffeId>>);

/// What the TLS setup needs from the CA.
pub trait Issuer: Send + Sync {
    fn issue_control_plane(
        &self,
        key: &rcgen::KeyPair,
        names: &[ServerName],
    ) -> Result<Issued, IssueError>;
    /// Every root trusted now, DER.
    fn trust_bundle(&self) -> Vec<Vec<u8>>;
}

impl<S: Store> Issuer for Identity<S> {
    fn issue_control_plane(
        &self,
        key: &rcgen::KeyPair,
        names: &[ServerName],
    ) -> Result<Issued, IssueError> {
        self.ca.issue_control_plane(key, names)
    }

    fn trust_bundle(&self) -> Vec<Vec<u8>> {
        self.ca.bundle()
    }
}

/// The server side of the port's TLS: the configuration in force, remade when due.
pub struct ControlTls {
    issuer: Arc<dyn Issuer>,
    names: Vec<ServerName>,
    bundle_file: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<InForce>>,
    /// One rebuild at a time.
    rebuilding: Mutex<()>,
}

struct InForce {
    config: Arc<ServerConfig>,
    /// The bundle it was built with (and that the file holds).
    bundle: Vec<Vec<u8>>,
    renew_at: SystemTime,
    not_after: SystemTime,
}

impl ControlTls {
    /// Issues the first certificate and writes the bundle file; fails when either cannot
    /// be done (the control plane does not start without its TLS).
    pub fn new(
        issuer: Arc<dyn Issuer>,
        names: Vec<ServerName>,
        data_dir: &Path,
    ) -> anyhow::Result<ControlTls> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let bundle_file = data_dir.join(TRUST_BUNDLE_FILE);
        let first = build(issuer.as_ref(), &names, &provider)?;
        write_bundle(&bundle_file, &first.bundle)?;
        Ok(ControlTls {
            issuer,
            names,
            bundle_file,
            provider,
            current: RwLock::new(Arc::new(first)),
            rebuilding: Mutex::new(()),
        })
    }

    /// `DATA_DIR/trust-bundle.pem`.
    pub fn bundle_file(&self) -> &Path {
        &self.bundle_file
    }

    /// The names the certificate carries besides its SPIFFE ID.
    pub fn names(&self) -> &[ServerName] {
        &self.names
    }

    /// The configuration for a new connection: the one in force, renewed first when it is
    /// due or the trust bundle changed. A renewal that fails keeps the one in force (it is
    /// retried on the next connection and by [`ControlTls::refresh`]) until it expires.
    pub fn config(&self) -> Arc<ServerConfig> {
        let current = self.in_force();
        if !self.is_due(&current) {
            return current.config.clone();
        }
        let _one = self
            .rebuilding
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let current = self.in_force();
        if !self.is_due(&current) {
            return current.config.clone();
        }
        match build(self.issuer.as_ref(), &self.names, &self.provider) {
            Ok(next) => {
                if next.bundle != current.bundle {
                    info!(
                        roots = next.bundle.len(),
                        file = %self.bundle_file.display(),
                        "the trust bundle changed: the control plane's certificate is reissued and the bundle file rewritten"
                    );
                    if let Err(e) = write_bundle(&self.bundle_file, &next.bundle) {
                        warn!(error = %e, "cannot rewrite the trust bundle file; clients given it may not verify the control plane");
                    }
                }
                let config = next.config.clone();
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(next);
                config
            }
            Err(e) => {
                let expired = SystemTime::now() >= current.not_after;
                warn!(error = %e, expired, "cannot renew the control plane's certificate; the one in force stays");
                current.config.clone()
            }
        }
    }

    /// Renews what is due; the control plane calls it every few seconds, so the bundle
    /// file follows a rotation even when no client connects.
    pub fn refresh(&self) {
        let _ = self.config();
    }

    fn in_force(&self) -> Arc<InForce> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn is_due(&self, current: &InForce) -> bool {
        SystemTime::now() >= current.renew_at || self.issuer.trust_bundle() != current.bundle
    }
}

/// A certificate for a new key, and the configuration that serves it.
fn build(
    issuer: &dyn Issuer,
    names: &[ServerName],
    provider: &Arc<CryptoProvider>,
) -> anyhow::Result<InForce> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| anyhow::anyhow!("generating the control plane's TLS key: {e}"))?;
    let issued = issuer
        .issue_control_plane(&key, names)
        .map_err(|e| anyhow::anyhow!("issuing the control plane's certificate: {e}"))?;
    let mut roots = RootCertStore::empty();
    for der in &issued.trust_bundle {
        roots
            .add(CertificateDer::from(der.clone()))
            .map_err(|e| anyhow::anyhow!("a trust bundle root is refused: {e}"))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| anyhow::anyhow!("the client certificate verifier: {e}"))?;
    let chain = issued
        .chain
        .iter()
        .map(|der| CertificateDer::from(der.clone()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let received = SystemTime::now();
    let life = issued
        .not_after
        .duration_since(received)
        .unwrap_or_default();
    Ok(InForce {
        config: Arc::new(config),
        renew_at: received + life.mul_f64(RENEW_AT),
        not_after: issued.not_after,
        // The bundle as the CA gives it now (the issued one may be ordered otherwise).
        bundle: issuer.trust_bundle(),
    })
}

/// Writes the bundle as PEM: a temporary name, synced, then renamed over the file, so a
/// reader never sees half of it.
fn write_bundle(path: &Path, bundle: &[Vec<u8>]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let pem = crate::identity::ca::bundle_pem(bundle);
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{TRUST_BUNDLE_FILE}.{}.tmp", std::process::id()));
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(pem.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(|e| anyhow::anyhow!("cannot write the trust bundle to {}: {e}", path.display()))
}

/// The names a control plane listening on `addrs` is reached by: `localhost`, this host's
/// name, the loopback addresses, every specific listening address, then `extra`
/// (`--tls-san`: a DNS name or an IP address each).
pub fn server_names(addrs: &[std::net::SocketAddr], extra: &[String]) -> Vec<ServerName> {
    let mut names = vec![ServerName::Dns("localhost".into())];
    if let Some(host) = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_ascii_lowercase())
        .filter(|h| !h.is_empty() && h != "localhost" && is_dns_name(h))
    {
        names.push(ServerName::Dns(host));
    }
    let mut ips: Vec<IpAddr> = vec![
        IpAddr::from([127, 0, 0, 1]),
        IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
    ];
    ips.extend(
        addrs
            .iter()
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified()),
    );
    for raw in extra {
        match raw.parse::<IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) => names.push(ServerName::Dns(raw.to_ascii_lowercase())),
        }
    }
    let mut seen = std::collections::HashSet::new();
    ips.retain(|ip| seen.insert(*ip));
    names.extend(ips.into_iter().map(ServerName::Ip));
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

/// Whether `--tls-san` NAME can go in a certificate as a DNS name (`*.` wildcards allowed).
pub fn is_dns_name(name: &str) -> bool {
    let name = name.strip_prefix("*.").unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The identity a client's verified certificate proves (rustls checked its chain).
pub fn peer_identity(connection: &rustls::CommonState) -> Option<Arc<SpiffeId>> {
    let der = connection.peer_certificates()?.first()?;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    malla_core::identity::spiffe_id_of(&cert).ok().map(Arc::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cover_loopback_the_listening_addresses_and_the_extra_ones() {
        let names = server_names(
            &[
                "127.0.0.1:7780".parse().unwrap(),
                "0.0.0.0:7781".parse().unwrap(),
                "10.1.2.3:7780".parse().unwrap(),
            ],
            &["control.example.com".into(), "192.0.2.7".into()],
        );
        assert_eq!(names[0], ServerName::Dns("localhost".into()));
        for want in [
            ServerName::Dns("control.example.com".into()),
            ServerName::Ip("127.0.0.1".parse().unwrap()),
            ServerName::Ip("::1".parse().unwrap()),
            ServerName::Ip("10.1.2.3".parse().unwrap()),
            ServerName::Ip("192.0.2.7".parse().unwrap()),
        ] {
            assert!(names.contains(&want), "{want:?} missing from {names:?}");
        }
        assert!(!names.contains(&ServerName::Ip("0.0.0.0".parse().unwrap())));
        let ips = names
            .iter()
            .filter(|n| matches!(n, ServerName::Ip(_)))
            .count();
        assert_eq!(ips, 4, "no duplicates: {names:?}");
    }

    #[test]
    fn dns_names() {
        for ok in ["control", "control.example.com", "*.example.com", "a-b.c"] {
            assert!(is_dns_name(ok), "{ok}");
        }
        for bad in ["", "a..b", "-a.b", "a b", "a_b", "http://x", "a.b:80", "*"] {
            assert!(!is_dns_name(bad), "{bad}");
        }
    }
}

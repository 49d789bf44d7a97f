//! TLS to the control plane: which CA the CLI trusts, and a failed handshake in words.
//!
//! The control plane's certificate comes from the mesh CA and proves the control plane's
//! SPIFFE ID (`spiffe://DOMAIN/control`), whatever address it is reached at
//! ([`malla_proxy::tls::control_plane_client_config`]); the CLI verifies it with the
//! control plane's trust bundle, `DATA_DIR/trust-bundle.pem`: `--ca-file` (or
//! `MALLA_CA_FILE`), else the default data directory's when the control plane is on this
//! machine, as the operator token.
//!
//! The file is read again for every connection (a small file, a few per command) and the
//! configuration rebuilt when it changed: `malla register --keep-alive` runs for weeks, and
//! a root rotation changes the bundle under it; a file that cannot be read then keeps the
//! last configuration.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use rustls::{pki_types::ServerName, ClientConfig};

/// Where the CLI looks for the control plane's trust bundle when it is given no
/// `--ca-file`: `malla control`'s default data directory, in the working directory.
pub const DEFAULT_CA_FILE: &str = "malla-data/trust-bundle.pem";

/// The ALPN protocol the CLI speaks to the control plane.
const ALPN: &[u8] = b"http/1.1";

/// The CA file in use and where it came from (for error messages).
#[derive(Clone, Debug)]
pub struct CaFile {
    pub path: PathBuf,
    /// `true`: the default (no `--ca-file`); `false`: `--ca-file` or `MALLA_CA_FILE`.
    pub default: bool,
}

impl CaFile {
    /// The CA file: `given` (`--ca-file` or `MALLA_CA_FILE`), else the default data
    /// directory's when the control plane is on this machine and the file is there.
    /// `None`: nothing to verify the control plane with.
    pub fn find(given: Option<&Path>, loopback: bool) -> Option<CaFile> {
        match given {
            Some(path) => Some(CaFile {
                path: path.to_path_buf(),
                default: false,
            }),
            None if loopback && Path::new(DEFAULT_CA_FILE).is_file() => Some(CaFile {
                path: DEFAULT_CA_FILE.into(),
                default: true,
            }),
            None => None,
        }
    }

    /// `FILE` with where it came from: what an error names.
    pub fn shown(&self) -> String {
        if self.default {
            format!(
                "{} (the default data directory of `malla control`)",
                self.path.display()
            )
        } else {
            self.path.display().to_string()
        }
    }
}

/// What to say when no CA file is found.
pub fn no_ca_file(addr: &str, loopback: bool) -> String {
    let here = if loopback {
        format!(" (no ./{DEFAULT_CA_FILE} here: `malla control` runs elsewhere, or with another --data-dir)")
    } else {
        String::new()
    };
    format!(
        "no CA to verify the control plane at {addr} with{here}: pass its trust bundle with --ca-file FILE or MALLA_CA_FILE; the control plane keeps it in DATA_DIR/trust-bundle.pem"
    )
}

/// The TLS side of a client: the CA file and the configuration made from its contents.
pub struct Tls {
    ca: CaFile,
    /// The configuration and the bytes it was made from.
    config: Mutex<(Vec<u8>, Arc<ClientConfig>)>,
}

impl Tls {
    /// Reads the CA file; an error says what is wrong with it.
    pub fn load(ca: CaFile) -> anyhow::Result<Tls> {
        let pem = std::fs::read(&ca.path).map_err(|e| {
            anyhow::anyhow!(
                "cannot read the CA file {} ({}): {e}",
                ca.path.display(),
                ca_flag(&ca)
            )
        })?;
        let config = build(&pem).map_err(|e| {
            anyhow::anyhow!(
                "the CA file {} ({}): {e}; pass the control plane's DATA_DIR/trust-bundle.pem",
                ca.path.display(),
                ca_flag(&ca)
            )
        })?;
        Ok(Tls {
            ca,
            config: Mutex::new((pem, config)),
        })
    }

    pub fn ca(&self) -> &CaFile {
        &self.ca
    }

    /// The configuration for a new connection: rebuilt when the file changed since the
    /// last one; the last one when the file cannot be read or is not a bundle now.
    pub fn config(&self) -> Arc<ClientConfig> {
        let mut current = self.config.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(pem) = std::fs::read(&self.ca.path) {
            if pem != current.0 {
                if let Ok(config) = build(&pem) {
                    *current = (pem, config);
                }
            }
        }
        current.1.clone()
    }
}

fn ca_flag(ca: &CaFile) -> &'static str {
    if ca.default {
        "the default, next to `malla control`'s data directory"
    } else {
        "--ca-file or MALLA_CA_FILE"
    }
}

fn build(pem: &[u8]) -> Result<Arc<ClientConfig>, malla_proxy::tls::TlsError> {
    let roots = malla_proxy::tls::roots_from_pem(pem)?;
    Ok(Arc::new(malla_proxy::tls::control_plane_client_config(
        roots, None, ALPN,
    )?))
}

/// The name sent in the ClientHello: the host the user named (a DNS name as SNI, for a
/// load balancer on the way); the certificate is checked for the control plane's SPIFFE
/// ID, not for this name.
pub fn server_name(authority: &str) -> ServerName<'static> {
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return ServerName::IpAddress(ip.into());
    }
    ServerName::try_from(host.to_string()).unwrap_or_else(|_| malla_proxy::tls::server_name())
}

/// What a failed handshake means for the call: the connection closing during it is
/// an outage (retried by `register --keep-alive`); any other failure is a refusal,
/// said in words with what to do.
pub enum Failure {
    Closed(String),
    Refused(String),
}

/// A failed handshake with the control plane at `addr`, verified with `ca`; `flag`
/// names how the user gave the address (`--control` or `MALLA_CONTROL`).
pub fn explain(error: &std::io::Error, ca: &CaFile, flag: &str) -> Failure {
    let file = ca.shown();
    let reason = match malla_proxy::tls::failure_reason(error) {
        "unknown-ca" => format!(
            "the control plane's certificate is not from the CA in {file}: pass the control plane's DATA_DIR/trust-bundle.pem with --ca-file (or MALLA_CA_FILE)"
        ),
        "wrong-identity" => format!(
            "the server is not the control plane: its certificate is from the CA in {file} but does not prove the control plane's identity (spiffe://DOMAIN/control); point {flag} at the control plane (`malla control`), not at a sidecar"
        ),
        "expired" => "the control plane's certificate has expired or is not valid yet (is this machine's clock right?)".to_string(),
        "peer-refused" => format!(
            "the control plane refused the handshake ({}); does it serve TLS 1.3 and HTTP/1.1?",
            inner(error)
        ),
        "protocol" => format!(
            "the server did not answer in TLS as the control plane does ({}); is {flag} the control plane's address? a control plane without TLS is reached with http://HOST:PORT",
            inner(error)
        ),
        "closed" => {
            return Failure::Closed(format!(
                "the connection closed during the TLS handshake ({error})"
            ))
        }
        _ => format!("the TLS handshake failed: {}", inner(error)),
    };
    Failure::Refused(reason)
}

/// rustls' error inside the I/O error, or the I/O error.
fn inner(error: &std::io::Error) -> String {
    error
        .get_ref()
        .map_or_else(|| error.to_string(), |inner| inner.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_name_is_the_host_named() {
        assert!(matches!(
            server_name("127.0.0.1:7780"),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("[::1]:7780"),
            ServerName::IpAddress(_)
        ));
        assert_eq!(
            server_name("control.example:7780"),
            ServerName::try_from("control.example").unwrap()
        );
    }

    #[test]
    fn a_given_file_wins_and_the_default_is_only_for_loopback() {
        let given = CaFile::find(Some(Path::new("/x/ca.pem")), false).unwrap();
        assert_eq!(given.path, Path::new("/x/ca.pem"));
        assert!(!given.default);
        // The test runs in the crate's directory, which holds no ./malla-data.
        assert!(CaFile::find(None, true).is_none());
        assert!(CaFile::find(None, false).is_none());
        let said = no_ca_file("127.0.0.1:7780", true);
        assert!(said.contains("--ca-file FILE or MALLA_CA_FILE"), "{said}");
        assert!(said.contains("./malla-data/trust-bundle.pem"), "{said}");
        assert!(said.contains("DATA_DIR/trust-bundle.pem"), "{said}");
    }

    #[test]
    fn a_ca_file_that_is_not_a_bundle_is_refused_with_its_name() {
        let dir = std::env::temp_dir().join(format!("malla-cli-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("not.pem");
        std::fs::write(&file, "hello").unwrap();
        let err = Tls::load(CaFile::find(Some(&file), false).unwrap())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(&file.display().to_string()), "{err}");
        assert!(err.contains("--ca-file or MALLA_CA_FILE"), "{err}");
        let err = Tls::load(CaFile::find(Some(&dir.join("missing.pem")), false).unwrap())
            .err()
            .unwrap()
            .to_string();
        assert!(err.starts_with("cannot read the CA file"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failed_handshake_in_words() {
        use rustls::CertificateError;
        let ca = CaFile {
            path: "/x/ca.pem".into(),
            default: false,
        };
        let io = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let refused = |e: rustls::Error| match explain(&io(e), &ca, "--control") {
            Failure::Refused(said) => said,
            Failure::Closed(said) => panic!("not a refusal: {said}"),
        };
        assert_eq!(
            refused(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            )),
            "the control plane's certificate is not from the CA in /x/ca.pem: pass the control plane's DATA_DIR/trust-bundle.pem with --ca-file (or MALLA_CA_FILE)"
        );
        let said = refused(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName,
        ));
        assert!(said.contains("is not the control plane"), "{said}");
        assert!(said.contains("--control"), "{said}");
        let said = refused(rustls::Error::InvalidCertificate(CertificateError::Expired));
        assert!(said.contains("expired"), "{said}");
        let said = refused(rustls::Error::InvalidMessage(
            rustls::InvalidMessage::InvalidContentType,
        ));
        assert!(said.contains("http://HOST:PORT"), "{said}");
        let eof = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "tls handshake eof");
        assert!(matches!(
            explain(&eof, &ca, "--control"),
            Failure::Closed(_)
        ));
    }
}

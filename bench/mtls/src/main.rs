//! `malla-bench-mtls`: the handshake client of `bench/mtls/run`.
//!
//! Opens new TLS 1.3 connections to one server in a loop, with `--concurrency` of them in
//! flight on `--threads` threads, presenting a client certificate (the servers measured
//! require one) and offering exactly one key exchange group: the hybrid post-quantum
//! `X25519MLKEM768` or classical `X25519`, so that the server has that group or nothing to
//! agree on. Each connection is a full handshake (session resumption off), then the client
//! sends `close_notify` and reads until the server closes: the server has then processed
//! the client's certificate and `Finished` (a server that refused the certificate answers
//! with an alert, counted as an error), and sent whatever session tickets it sends. The
//! socket is then closed with a reset (`SO_LINGER` 0), so tens of thousands of connections
//! leave no `TIME_WAIT` behind to run out of ports.
//!
//! The server's certificate chain is verified against `--ca` (signatures and validity, as a
//! sidecar does); its name is not checked, since the servers measured name a SPIFFE ID.
//!
//! Prints one JSON object on stdout: handshakes completed in the measured window (after
//! `--warmup`), errors by kind, the rate, and the groups the server agreed on.

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{bail, Context as _};
use clap::{Parser, ValueEnum};
use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor, Resumption,
    },
    crypto::{aws_lc_rs, CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
    server::ParsedCertificate,
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    time::Instant,
};

#[derive(Parser)]
#[command(
    name = "malla-bench-mtls",
    about = "New TLS 1.3 connections with a client certificate in a loop; prints handshakes per second as JSON"
)]
struct Args {
    /// The server, IP:PORT.
    #[arg(long)]
    connect: SocketAddr,
    /// PEM roots the server's chain must lead to.
    #[arg(long)]
    ca: PathBuf,
    /// PEM certificate chain presented as the client certificate (leaf first).
    #[arg(long)]
    cert: PathBuf,
    /// Its private key (PEM, PKCS#8).
    #[arg(long)]
    key: PathBuf,
    /// The one key exchange group offered.
    #[arg(long, value_enum)]
    group: Group,
    /// Seconds measured.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of the same load before, not counted.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Connections in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Worker threads of the client.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Seconds one connection may take (connect, handshake, close) before it counts as an
    /// error.
    #[arg(long, default_value_t = 5.0)]
    timeout: f64,
}

#[derive(Clone, Copy, ValueEnum)]
enum Group {
    /// The hybrid post-quantum group (ML-KEM-768 with X25519).
    #[value(name = "X25519MLKEM768", alias = "hybrid")]
    X25519Mlkem768,
    /// Classical X25519.
    #[value(name = "X25519", alias = "x25519")]
    X25519,
}

impl Group {
    fn kx(self) -> &'static dyn rustls::crypto::SupportedKxGroup {
        match self {
            Group::X25519Mlkem768 => aws_lc_rs::kx_group::X25519MLKEM768,
            Group::X25519 => aws_lc_rs::kx_group::X25519,
        }
    }
}

/// What the connections counted, shared by the tasks.
#[derive(Default)]
struct Tally {
    handshakes: u64,
    warmup_handshakes: u64,
    errors: u64,
    error_kinds: BTreeMap<String, u64>,
    groups: BTreeMap<String, u64>,
    protocols: BTreeMap<String, u64>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !(args.duration > 0.0 && args.warmup >= 0.0 && args.timeout > 0.0) {
        bail!("--duration and --timeout must be > 0, --warmup >= 0");
    }
    if args.concurrency == 0 || args.threads == 0 {
        bail!("--concurrency and --threads must be at least 1");
    }
    let config = Arc::new(client_config(&args)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()?;
    let result = runtime.block_on(run(&args, config))?;
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, &result)?;
    writeln!(out)?;
    Ok(())
}

async fn run(args: &Args, config: Arc<ClientConfig>) -> anyhow::Result<serde_json::Value> {
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = ServerName::try_from("bench.mtls").context("server name")?;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let started = Instant::now();
    let measure_from = started + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);
    let timeout = Duration::from_secs_f64(args.timeout);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let (connector, name, tally) = (connector.clone(), name.clone(), tally.clone());
        let addr = args.connect;
        tasks.spawn(async move {
            while Instant::now() < end {
                let outcome = tokio::time::timeout(timeout, one(&connector, &name, addr)).await;
                let done = Instant::now();
                if done > end {
                    break;
                }
                let measured = done >= measure_from;
                let failed = {
                    let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
                    match outcome {
                        Ok(Ok((group, protocol))) => {
                            if measured {
                                t.handshakes += 1;
                                *t.groups.entry(group).or_default() += 1;
                                *t.protocols.entry(protocol).or_default() += 1;
                            } else {
                                t.warmup_handshakes += 1;
                            }
                            false
                        }
                        Ok(Err(e)) => {
                            if measured {
                                t.errors += 1;
                                *t.error_kinds.entry(kind(&e)).or_default() += 1;
                            }
                            true
                        }
                        Err(_) => {
                            if measured {
                                t.errors += 1;
                                *t.error_kinds.entry("timeout".into()).or_default() += 1;
                            }
                            false
                        }
                    }
                };
                if failed {
                    // a refused connection (server gone) must not spin
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let seconds = end.duration_since(measure_from).as_secs_f64();
    let t = tally.lock().unwrap_or_else(|p| p.into_inner());
    Ok(serde_json::json!({
        "server": args.connect.to_string(),
        "group_offered": args.group.kx().name().as_str().unwrap_or("?"),
        "handshakes": t.handshakes,
        "warmup_handshakes": t.warmup_handshakes,
        "errors": t.errors,
        "error_kinds": t.error_kinds,
        "seconds": seconds,
        "rate": t.handshakes as f64 / seconds,
        "negotiated": t.groups,
        "protocols": t.protocols,
        "concurrency": args.concurrency,
        "threads": args.threads,
    }))
}

/// One connection: TCP connect, full handshake, `close_notify`, read until the server
/// closes. Returns the group and protocol version agreed.
async fn one(
    connector: &tokio_rustls::TlsConnector,
    name: &ServerName<'static>,
    addr: SocketAddr,
) -> std::io::Result<(String, String)> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut tls = connector.connect(name.clone(), tcp).await?;
    let (_, conn) = tls.get_ref();
    let group = conn
        .negotiated_key_exchange_group()
        .and_then(|g| g.name().as_str())
        .unwrap_or("?")
        .to_string();
    let protocol = conn
        .protocol_version()
        .and_then(|v| v.as_str())
        .unwrap_or("?")
        .to_string();
    tls.shutdown().await?;
    let mut buf = [0u8; 4096];
    loop {
        match tls.read(&mut buf).await {
            Ok(0) => break,
            Ok(_) => continue,
            // a server that closes without close_notify: the handshake was done
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
    }
    let (tcp, _) = tls.into_inner();
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    Ok((group, protocol))
}

/// A short, bounded name for an error.
fn kind(e: &std::io::Error) -> String {
    e.to_string().chars().take(80).collect()
}

fn client_config(args: &Args) -> anyhow::Result<ClientConfig> {
    let mut provider: CryptoProvider = aws_lc_rs::default_provider();
    provider.kx_groups = vec![args.group.kx()];
    let provider = Arc::new(provider);
    let roots = Arc::new(roots(&args.ca)?);
    let chain: Vec<CertificateDer<'static>> = pem_blocks(&args.cert, "CERTIFICATE")?
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let key = pem_blocks(&args.key, "PRIVATE KEY")?
        .into_iter()
        .next()
        .with_context(|| format!("{}: no PKCS#8 PRIVATE KEY block", args.key.display()))?;
    let verifier = Arc::new(ChainOnly {
        roots,
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)))
        .context("the client certificate and key")?;
    config.resumption = Resumption::disabled();
    Ok(config)
}

fn pem_blocks(path: &Path, tag: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let blocks: Vec<Vec<u8>> = pem::parse_many(&text)
        .with_context(|| format!("{}: not PEM", path.display()))?
        .into_iter()
        .filter(|b| b.tag() == tag)
        .map(|b| b.into_contents())
        .collect();
    if blocks.is_empty() {
        bail!("{}: no {tag} block", path.display());
    }
    Ok(blocks)
}

fn roots(path: &Path) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for der in pem_blocks(path, "CERTIFICATE")? {
        roots
            .add(CertificateDer::from(der))
            .with_context(|| format!("{}: a root is refused", path.display()))?;
    }
    Ok(roots)
}

/// Verifies the server's chain to the roots (rustls' webpki check), not its name.
#[derive(Debug)]
struct ChainOnly {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

//! The control plane under test: [`TestControl`] runs `malla_control::server::Control`
//! in-process, its HTTP API and DNS on `127.0.0.1:0`, its store in a fresh temporary
//! directory ([`TempDir`], removed when dropped), and offers a small JSON client for the API
//! ([`api::Api`]). The APIs (HTTP/JSON and gRPC) are served on one port
//! ([`TestControl::http_addr`]) and again on the port kept for sidecars configured with the
//! old gRPC address ([`TestControl::grpc_addr`]): tests may use either for either API.
//!
//! ```ignore
//! let mut control = TestControl::start().await;
//! control.api().register("orders", "o-1", &json!({"address": "127.0.0.1", "port": 8080})).await;
//! control.restart().await; // same data directory, same HTTP address when it is free
//! assert_eq!(control.api().instance_ids("orders", "").await, ["o-1"]);
//! ```
//!
//! Stopping ([`TestControl::stop`]) stops the APIs and closes the store, so the same data
//! directory can be opened again at once, by [`TestControl::start_again`] or by a real
//! `malla control` process. Dropping a `TestControl` stops it without waiting.
//!
//! The HTTP API's operator routes require the operator token, which the control plane
//! keeps in its data directory: [`TestControl::api`] sends it on every request, and
//! [`operator_token_at`] finds it for a client (the CLI under test) that knows only the
//! address.

pub mod api;
pub mod tls;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, LazyLock, Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use malla_control::{
    authorizations::Authorizations,
    events::EventRing,
    identity::Identity,
    policies::Policies,
    registry::Registry,
    server::{Control, ControlConfig, DnsSettings, IdentitySettings},
    serving::ServeSettings,
    store::embedded::EmbeddedStore,
};

use self::api::Api;

/// The data directory of the test control plane last started at each HTTP address.
static DATA_DIRS: LazyLock<Mutex<std::collections::HashMap<SocketAddr, PathBuf>>> =
    LazyLock::new(Default::default);

/// The operator token in force at the test control plane serving `addr` (its HTTP address
/// or its second port), read from its data directory; `None` when no test control plane
/// of this process serves there.
pub fn operator_token_at(addr: SocketAddr) -> Option<String> {
    let dir = DATA_DIRS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&addr)
        .cloned()?;
    api::operator_token(&dir)
}

/// A directory under [`std::env::temp_dir`] with a name no other test (or test process)
/// uses; it is removed, with everything in it, when dropped.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `TMP/malla-test-PREFIX-PID-N-NANOS`.
    pub fn new(prefix: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "malla-test-{prefix}-{}-{n}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A running (or stopped, between [`stop`](TestControl::stop) and
/// [`start_again`](TestControl::start_again)) control plane over one data directory.
pub struct TestControl {
    control: Option<Control>,
    http_addr: SocketAddr,
    grpc_addr: SocketAddr,
    dns_addr: Option<SocketAddr>,
    dns: bool,
    serving: ServeSettings,
    identity: IdentitySettings,
    // Declared last: dropped after the control plane.
    dir: TempDir,
}

impl std::fmt::Debug for TestControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestControl")
            .field("running", &self.control.is_some())
            .field("http_addr", &self.http_addr)
            .field("grpc_addr", &self.grpc_addr)
            .field("dns_addr", &self.dns_addr)
            .field("dir", &self.dir.path)
            .finish()
    }
}

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

impl TestControl {
    /// A control plane with the HTTP API and DNS on ephemeral loopback ports and an empty
    /// store. Call from inside a tokio runtime (the control plane's tasks run on it).
    pub async fn start() -> TestControl {
        Self::start_in(TempDir::new("control"), true).await
    }

    /// The same without the DNS interface.
    pub async fn start_without_dns() -> TestControl {
        Self::start_in(TempDir::new("control"), false).await
    }

    /// A control plane without DNS whose serving limits are `serving` (a short head
    /// timeout, a small connection limit...).
    pub async fn start_serving(serving: ServeSettings) -> TestControl {
        Self::start_with(TempDir::new("control"), false, serving).await
    }

    /// A control plane over `dir` (which may hold the store of an earlier run).
    pub async fn start_in(dir: TempDir, dns: bool) -> TestControl {
        Self::start_with(dir, dns, ServeSettings::default()).await
    }

    /// A control plane without DNS whose CA has `identity`'s settings (a short
    /// certificate TTL, another trust domain, an operator's CA files).
    pub async fn start_with_identity(identity: IdentitySettings) -> TestControl {
        let mut control = TestControl {
            identity,
            ..Self::unstarted(TempDir::new("control"), false, ServeSettings::default())
        };
        control.start_again().await;
        control
    }

    async fn start_with(dir: TempDir, dns: bool, serving: ServeSettings) -> TestControl {
        let mut control = Self::unstarted(dir, dns, serving);
        control.start_again().await;
        control
    }

    fn unstarted(dir: TempDir, dns: bool, serving: ServeSettings) -> TestControl {
        TestControl {
            control: None,
            http_addr: any_port(),
            grpc_addr: any_port(),
            dns_addr: None,
            dns,
            serving,
            identity: IdentitySettings::default(),
            dir,
        }
    }

    /// Starts the control plane again over the same data directory (after
    /// [`stop`](Self::stop)); the HTTP API gets its previous address back when that is
    /// free (it is on loopback, unless a test took it meanwhile), another one otherwise.
    /// DNS gets a new port. A no-op when running.
    pub async fn start_again(&mut self) {
        if self.control.is_some() {
            return;
        }
        let mut http_addr = self.http_addr;
        let mut attempt = 0;
        let control = loop {
            attempt += 1;
            let config = ControlConfig {
                data_dir: self.dir.path.clone(),
                http_addr,
                grpc_addr: any_port(),
                dns_addr: self.dns.then(any_port),
                dns: DnsSettings::default(),
                identity: self.identity.clone(),
                tls_names: Vec::new(),
            };
            match Control::start_with(config, self.serving.clone()).await {
                Ok(control) => break control,
                // The previous address may linger for a moment: retry, then take any.
                Err(e) if http_addr.port() != 0 && attempt < 50 => {
                    if attempt == 49 {
                        tracing_hint(&e);
                        http_addr = any_port();
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!(
                    "the control plane did not start over {}: {e:#}",
                    self.dir.path.display()
                ),
            }
        };
        self.http_addr = control.http_addr;
        self.grpc_addr = control.grpc_addr;
        let mut dirs = DATA_DIRS.lock().unwrap_or_else(|e| e.into_inner());
        for addr in [control.http_addr, control.grpc_addr] {
            dirs.insert(addr, self.dir.path.clone());
        }
        drop(dirs);
        self.dns_addr = control.dns_addr;
        self.control = Some(control);
    }

    /// Stops serving and closes the store (the data directory stays). A no-op when stopped.
    pub async fn stop(&mut self) {
        let Some(control) = self.control.take() else {
            return;
        };
        let store = control.registry.store().clone();
        crate::client::within("stopping the control plane", control.stop()).await;
        crate::client::within("closing the store", store.close())
            .await
            .unwrap_or_else(|e| panic!("closing the store failed: {e}"));
    }

    /// The identity settings the next [`start_again`](Self::start_again) starts with: a
    /// control plane restarted with another `--mtls-mode`, say.
    pub fn set_identity(&mut self, identity: IdentitySettings) {
        self.identity = identity;
    }

    /// [`stop`](Self::stop), then [`start_again`](Self::start_again).
    pub async fn restart(&mut self) {
        self.stop().await;
        self.start_again().await;
    }

    pub fn is_running(&self) -> bool {
        self.control.is_some()
    }

    /// A client for the HTTP API at its current address (the one port of both APIs),
    /// sending the operator token in force (read from the data directory, so it follows a
    /// rotation).
    pub fn api(&self) -> Api {
        Api::new(self.http_addr).with_credentials_of(&self.dir.path)
    }

    /// A client for the HTTP API (over TLS) that sends no operator token.
    pub fn api_without_token(&self) -> Api {
        Api::new(self.http_addr).with_trust(&self.trust_bundle_path())
    }

    /// A client for the HTTP API (over TLS) that presents `svid`, a workload's
    /// certificate, and no operator token.
    pub fn api_as(&self, svid: &malla_proxy::identity::Svid) -> Api {
        Api::new(self.http_addr).with_tls(&self.trust_bundle_path(), Some(svid))
    }

    /// `DATA_DIR/trust-bundle.pem`: what clients verify the control plane's TLS with.
    pub fn trust_bundle_path(&self) -> PathBuf {
        tls::bundle_path(&self.dir.path)
    }

    /// A gRPC channel over TLS to the API port (as a sidecar before its first
    /// certificate: none presented).
    pub async fn grpc_channel(&self) -> tonic::transport::Channel {
        self.grpc_channel_to(self.http_addr).await
    }

    /// The same to `addr` (either port).
    pub async fn grpc_channel_to(&self, addr: SocketAddr) -> tonic::transport::Channel {
        tls::grpc_channel(addr, &self.trust_bundle_path(), None)
            .await
            .unwrap_or_else(|e| panic!("no gRPC channel to the control plane at {addr}: {e}"))
    }

    /// A gRPC channel over TLS to the API port whose every call proves the operator.
    pub async fn operator_channel(&self) -> tls::OperatorChannel {
        self.operator_channel_to(self.http_addr).await
    }

    /// The same to `addr` (either port).
    pub async fn operator_channel_to(&self, addr: SocketAddr) -> tls::OperatorChannel {
        self.as_operator(self.grpc_channel_to(addr).await)
    }

    /// `channel`, proving this control plane's operator (its token now) on every call.
    pub fn as_operator(&self, channel: tonic::transport::Channel) -> tls::OperatorChannel {
        let token = api::operator_token(&self.dir.path).expect("the operator token file");
        tls::as_operator(channel, &token)
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The second address of both APIs, the gRPC port of earlier versions (new on every
    /// start). The gRPC API is on [`http_addr`](Self::http_addr) too.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The DNS interface's address (UDP and TCP); panics when started without DNS.
    pub fn dns_addr(&self) -> SocketAddr {
        self.dns_addr
            .expect("this control plane was started without DNS")
    }

    /// The API's base URL, as the CLI's `--control` and a sidecar's `[control] url`
    /// take it (TLS).
    pub fn url(&self) -> String {
        format!("https://{}", self.http_addr)
    }

    /// The running control plane's registry (in-process reads and watches).
    pub fn registry(&self) -> &Arc<Registry<EmbeddedStore>> {
        &self
            .control
            .as_ref()
            .expect("the control plane is stopped")
            .registry
    }

    /// The running control plane's resilience policies (in-process reads and writes).
    pub fn policies(&self) -> &Arc<Policies<EmbeddedStore>> {
        &self
            .control
            .as_ref()
            .expect("the control plane is stopped")
            .policies
    }

    /// The running control plane's authorization policies (in-process reads and writes).
    pub fn authorizations(&self) -> &Arc<Authorizations<EmbeddedStore>> {
        &self
            .control
            .as_ref()
            .expect("the control plane is stopped")
            .authorizations
    }

    /// The CA and the join tokens, to create tokens in-process.
    pub fn identity(&self) -> &Arc<Identity<EmbeddedStore>> {
        &self
            .control
            .as_ref()
            .expect("the control plane is running")
            .identity
    }

    /// The resilience events sidecars reported to the running control plane.
    pub fn events(&self) -> &Arc<EventRing> {
        &self
            .control
            .as_ref()
            .expect("the control plane is stopped")
            .events
    }

    pub fn data_dir(&self) -> &Path {
        &self.dir.path
    }
}

fn tracing_hint(e: &anyhow::Error) {
    eprintln!("control plane: previous HTTP address unavailable ({e:#}); using a new port");
}

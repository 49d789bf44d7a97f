//! Clients of the control plane's TLS port: the trust bundle it keeps in its data
//! directory (`DATA_DIR/trust-bundle.pem`), gRPC channels that verify it the way sidecars
//! do (the control plane's SPIFFE ID, through `malla_proxy::tls`) with or without a
//! workload's certificate, and the operator token as gRPC metadata.

use std::{path::Path, sync::Arc};

use hyper_util::rt::TokioIo;
use malla_proxy::{identity::Svid, tls};
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::BoxError;

/// The file in a control plane's data directory that holds its trust bundle.
pub fn bundle_path(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join(malla_control::serving::tls::TRUST_BUNDLE_FILE)
}

/// A client configuration that trusts the bundle in `bundle` (a PEM file), presents
/// `svid` when given, and offers `alpn`.
pub fn client_config(
    bundle: &Path,
    svid: Option<&Svid>,
    alpn: &[u8],
) -> Result<Arc<ClientConfig>, BoxError> {
    let pem = std::fs::read(bundle)
        .map_err(|e| format!("cannot read the trust bundle {}: {e}", bundle.display()))?;
    let roots = tls::roots_from_pem(&pem)?;
    Ok(Arc::new(tls::control_plane_client_config(
        roots, svid, alpn,
    )?))
}

/// Opens a TLS connection to `addr` with `config`.
pub async fn connect(
    addr: std::net::SocketAddr,
    config: Arc<ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, BoxError> {
    let tcp = TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    Ok(tokio_rustls::TlsConnector::from(config)
        .connect(tls::server_name(), tcp)
        .await?)
}

/// A gRPC channel to the control plane at `addr` over TLS, verified with `bundle`,
/// presenting `svid` when given (a workload's writes), connected now.
pub async fn grpc_channel(
    addr: std::net::SocketAddr,
    bundle: &Path,
    svid: Option<&Svid>,
) -> Result<Channel, BoxError> {
    grpc_channel_from(
        Endpoint::from_shared(format!("http://{addr}"))?,
        addr,
        bundle,
        svid,
    )
    .await
}

/// [`grpc_channel`] with the settings of `endpoint` (a user agent...).
pub async fn grpc_channel_from(
    endpoint: Endpoint,
    addr: std::net::SocketAddr,
    bundle: &Path,
    svid: Option<&Svid>,
) -> Result<Channel, BoxError> {
    let config = client_config(bundle, svid, b"h2")?;
    let connector = tower::service_fn(move |_: Uri| {
        let config = config.clone();
        async move { connect(addr, config).await.map(TokioIo::new) }
    });
    Ok(endpoint.connect_with_connector(connector).await?)
}

/// Sends the operator token on every gRPC call (`authorization: Bearer TOKEN`).
#[derive(Clone)]
pub struct Operator(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl Operator {
    pub fn new(token: &str) -> Operator {
        Operator(
            format!("Bearer {token}")
                .parse()
                .expect("an operator token is ASCII"),
        )
    }
}

impl tonic::service::Interceptor for Operator {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// A channel that proves the operator on every call.
pub type OperatorChannel = tonic::codegen::InterceptedService<Channel, Operator>;

/// `channel`, proving the operator with `token` on every call.
pub fn as_operator(channel: Channel, token: &str) -> OperatorChannel {
    tonic::codegen::InterceptedService::new(channel, Operator::new(token))
}

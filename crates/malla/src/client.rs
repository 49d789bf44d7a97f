//! A small JSON client for the control plane's HTTP API, used by the CLI verbs.

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Where the CLI finds the control plane: `--control URL` or `MALLA_CONTROL`.
#[derive(clap::Args, Clone, Debug)]
pub struct ControlArg {
    /// The control plane's HTTP API.
    #[arg(
        long = "control",
        env = "MALLA_CONTROL",
        default_value = "http://127.0.0.1:7780",
        value_name = "URL"
    )]
    pub url: String,
}

pub struct Client {
    base: Uri,
    authority: String,
    runtime: tokio::runtime::Runtime,
}

impl Client {
    pub fn new(arg: &ControlArg) -> anyhow::Result<Self> {
        let base: Uri = arg.url.parse().with_context(|| {
            format!(
                "invalid --control URL {:?}; expected http://HOST:PORT",
                arg.url
            )
        })?;
        if base.scheme_str() != Some("http") {
            bail!("--control {:?}: only http:// URLs are supported", arg.url);
        }
        let authority = base
            .authority()
            .ok_or_else(|| anyhow!("--control {:?} has no host", arg.url))?
            .to_string();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Client {
            base,
            authority,
            runtime,
        })
    }

    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(Method::GET, path, None)
    }

    pub fn put(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.call(Method::PUT, path, Some(body))
    }

    pub fn delete(&self, path: &str) -> anyhow::Result<Value> {
        self.call(Method::DELETE, path, None)
    }

    pub fn call(&self, method: Method, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        self.block_on(self.request(method, path, body))
    }

    /// Runs async work (several calls, signals) on the client's runtime.
    pub fn block_on<F: std::future::Future>(&self, work: F) -> F::Output {
        self.runtime.block_on(work)
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let target = format!("{}{}", self.base.path().trim_end_matches('/'), path);
        let stream = tokio::net::TcpStream::connect(&self.authority).await.map_err(|e| {
            anyhow!(
                "cannot reach the control plane at {}: {e}; start it with `malla control` or point --control / MALLA_CONTROL at it",
                self.base
            )
        })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(target)
            .header(http::header::HOST, &self.authority)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(payload)))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let value: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).trim().to_string()));
        if !status.is_success() {
            let message = value["error"]["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            bail!("{message} (HTTP {})", status.as_u16());
        }
        Ok(value)
    }
}

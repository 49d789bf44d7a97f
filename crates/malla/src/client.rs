//! A small JSON client for the control plane's HTTP API, used by the CLI verbs.
//!
//! Every call is bounded by `--request-timeout` (connect and answer together): a control
//! plane that accepts and never answers must not hang a script.

use std::{fmt, sync::OnceLock, time::Duration};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// The control plane's default address, the same for the CLI and `malla proxy`.
pub const DEFAULT_CONTROL: &str = "127.0.0.1:7780";

/// Where the CLI finds the control plane, and how long it waits for it.
#[derive(clap::Args, Clone, Debug)]
pub struct ControlArg {
    /// The control plane's address: HOST:PORT or http://HOST:PORT.
    #[arg(
        long = "control",
        env = "MALLA_CONTROL",
        default_value = DEFAULT_CONTROL,
        value_name = "HOST:PORT"
    )]
    pub control: String,
    /// How long one call to the control plane may take, connecting included (e.g. 500ms,
    /// 30s, 2m; 0 waits for ever).
    #[arg(
        long = "request-timeout",
        env = "MALLA_REQUEST_TIMEOUT",
        default_value = "30s",
        value_name = "DURATION",
        value_parser = parse_duration
    )]
    pub request_timeout: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s.trim()).map_err(|e| format!("{e} (expected e.g. 500ms, 30s, 2m)"))
}

/// How the user named the control plane: `--control` or `MALLA_CONTROL`, so that an
/// error names what they typed. `main` sets it from clap's record of where the value
/// came from.
static CONTROL_SOURCE: OnceLock<&'static str> = OnceLock::new();

pub fn set_control_from_env(from_env: bool) {
    let _ = CONTROL_SOURCE.set(if from_env {
        "MALLA_CONTROL"
    } else {
        "--control"
    });
}

fn control_source() -> &'static str {
    CONTROL_SOURCE.get().copied().unwrap_or("--control")
}

/// Reads `HOST:PORT` or `http://HOST:PORT[/]` into the `HOST:PORT` to connect to.
pub fn parse_control(raw: &str) -> Result<String, String> {
    let flag = control_source();
    let rest = match raw.split_once("://") {
        Some(("http", rest)) => rest,
        Some((scheme, _)) => {
            return Err(format!(
                "{flag} {raw:?}: only http:// is supported (not {scheme}://); give HOST:PORT or http://HOST:PORT"
            ))
        }
        None => raw,
    };
    let authority = rest.trim_end_matches('/');
    let valid = !authority.is_empty()
        && !authority.contains('/')
        && authority.parse::<http::uri::Authority>().is_ok()
        && authority
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !valid {
        return Err(format!(
            "{flag} {raw:?}: expected HOST:PORT or http://HOST:PORT (e.g. {DEFAULT_CONTROL})"
        ));
    }
    Ok(authority.to_string())
}

/// Why a call failed; the keep-alive loop tells them apart (an outage is retried, a lost
/// lease is registered again, a refusal is reported).
#[derive(Debug)]
pub enum CallError {
    /// No connection could be made.
    Unreachable { addr: String, reason: String },
    /// Connected (or trying to) but no complete answer within the timeout.
    TimedOut { addr: String, after: Duration },
    /// The connection failed mid-call.
    Transport { addr: String, reason: String },
    /// The control plane answered with an error.
    Api {
        status: StatusCode,
        code: String,
        message: String,
    },
}

impl CallError {
    /// The control plane could not be asked (as opposed to: it answered no).
    pub fn is_outage(&self) -> bool {
        match self {
            CallError::Unreachable { .. }
            | CallError::TimedOut { .. }
            | CallError::Transport { .. } => true,
            CallError::Api { status, .. } => status.is_server_error(),
        }
    }

    /// The API's error code (`lease_not_found`, `not_found`...), when it answered one.
    pub fn code(&self) -> Option<&str> {
        match self {
            CallError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let flag = control_source();
        match self {
            CallError::Unreachable { addr, reason } => write!(
                f,
                "cannot reach the control plane at {addr}: {reason}; start it with `malla control` or point {flag} at it"
            ),
            CallError::TimedOut { addr, after } => write!(
                f,
                "the control plane at {addr} did not answer within {} (--request-timeout); check that {flag} points at a running control plane (`malla control`), or allow more time with --request-timeout",
                humantime::format_duration(*after)
            ),
            CallError::Transport { addr, reason } => write!(
                f,
                "the connection to the control plane at {addr} failed: {reason}; is {flag} the control plane's address?"
            ),
            CallError::Api {
                status, message, ..
            } => write!(f, "{message} (HTTP {})", status.as_u16()),
        }
    }
}

impl std::error::Error for CallError {}

pub struct Client {
    /// `HOST:PORT`.
    authority: String,
    /// What error messages show: as the user wrote it.
    shown: String,
    timeout: Duration,
    runtime: tokio::runtime::Runtime,
}

impl Client {
    pub fn new(arg: &ControlArg) -> anyhow::Result<Self> {
        let authority = parse_control(&arg.control).map_err(anyhow::Error::msg)?;
        let shown = if arg.control.contains("://") {
            arg.control.trim_end_matches('/').to_string()
        } else {
            authority.clone()
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Client {
            authority,
            shown,
            timeout: arg.request_timeout,
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
        Ok(self.block_on(self.request(method, path, body))?)
    }

    /// Runs async work (several calls, signals) on the client's runtime.
    pub fn block_on<F: std::future::Future>(&self, work: F) -> F::Output {
        self.runtime.block_on(work)
    }

    /// One call, bounded by the request timeout.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, CallError> {
        let call = self.request_unbounded(method, path, body);
        if self.timeout.is_zero() {
            return call.await;
        }
        tokio::time::timeout(self.timeout, call)
            .await
            .unwrap_or_else(|_| {
                Err(CallError::TimedOut {
                    addr: self.shown.clone(),
                    after: self.timeout,
                })
            })
    }

    async fn request_unbounded(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, CallError> {
        let transport = |e: &dyn fmt::Display| CallError::Transport {
            addr: self.shown.clone(),
            reason: e.to_string(),
        };
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|e| CallError::Unreachable {
                addr: self.shown.clone(),
                reason: e.to_string(),
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| transport(&e))?;
        tokio::spawn(conn);
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, &self.authority)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(payload)))
            .map_err(|e| transport(&e))?;
        let resp = sender.send_request(req).await.map_err(|e| transport(&e))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| transport(&e))?
            .to_bytes();
        let value: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).trim().to_string()));
        if !status.is_success() {
            let message = value["error"]["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            let code = value["error"]["code"].as_str().unwrap_or("").to_string();
            return Err(CallError::Api {
                status,
                code,
                message,
            });
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_takes_host_port_or_an_http_url() {
        for (raw, want) in [
            ("127.0.0.1:7780", "127.0.0.1:7780"),
            ("http://127.0.0.1:7780", "127.0.0.1:7780"),
            ("http://127.0.0.1:7780/", "127.0.0.1:7780"),
            ("localhost:80", "localhost:80"),
            ("[::1]:7780", "[::1]:7780"),
            ("http://[::1]:7780", "[::1]:7780"),
        ] {
            assert_eq!(parse_control(raw).as_deref(), Ok(want), "{raw}");
        }
        for raw in [
            "",
            "127.0.0.1",
            "http://",
            "ftp://x:1",
            "x:y",
            "http://x:1/api",
            ":80",
        ] {
            let err = parse_control(raw).unwrap_err();
            assert!(err.starts_with("--control "), "{raw}: {err}");
        }
    }
}

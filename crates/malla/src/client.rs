//! A small JSON client for the control plane's HTTP API, used by the CLI verbs.
//!
//! Every call is bounded by `--request-timeout` (connect, TLS handshake and answer
//! together): a control plane that accepts and never answers must not hang a script.
//!
//! `HOST:PORT` and `https://HOST:PORT` are TLS, the control plane verified with its trust
//! bundle ([`tls`]); `http://HOST:PORT` is plaintext, for a control plane that still
//! accepts it.

mod tls;

use std::{fmt, path::PathBuf, sync::OnceLock, time::Duration};

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
    /// The control plane's address: HOST:PORT or https://HOST:PORT (TLS, verified with
    /// --ca-file), or http://HOST:PORT (plaintext, while the control plane accepts it).
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
    /// The operator token the control plane's HTTP API requires (`malla control` printed
    /// it at its first start; it keeps it in DATA_DIR/operator.token). Without this or
    /// --token-file, the token of a control plane on this machine is read from
    /// ./malla-data/operator.token, `malla control`'s default data directory.
    #[arg(
        long = "token",
        env = "MALLA_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,
    /// A file holding the operator token, e.g. DATA_DIR/operator.token of the control
    /// plane.
    #[arg(long = "token-file", env = "MALLA_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// The CA the control plane's certificate is verified with: its trust bundle, a PEM
    /// file (the control plane keeps it in DATA_DIR/trust-bundle.pem). Without it, a
    /// control plane on this machine is verified with ./malla-data/trust-bundle.pem,
    /// `malla control`'s default data directory. Not used with http://.
    #[arg(long = "ca-file", env = "MALLA_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
}

/// Where the CLI looks for the operator token when it is given neither `--token` nor
/// `--token-file`: `malla control`'s default data directory, in the working directory.
pub const DEFAULT_TOKEN_FILE: &str = "malla-data/operator.token";

/// The operator token to send and where it came from (for error messages).
#[derive(Clone, Debug)]
struct Token {
    value: String,
    from: String,
}

impl ControlArg {
    /// The operator token: `--token` (or `MALLA_TOKEN`), else the file of `--token-file`
    /// (or `MALLA_TOKEN_FILE`), else the default data directory's file when the control
    /// plane is on this machine (a token is never sent elsewhere unasked).
    fn token(&self, authority: &str) -> anyhow::Result<Option<Token>> {
        if let Some(value) = &self.token {
            let value = value.trim();
            anyhow::ensure!(
                !value.is_empty(),
                "--token (or MALLA_TOKEN) is empty; give the operator token or leave it out"
            );
            return Ok(Some(Token {
                value: value.to_string(),
                from: "--token (or MALLA_TOKEN)".into(),
            }));
        }
        if let Some(file) = &self.token_file {
            let value = read_token(file).map_err(|e| {
                anyhow::anyhow!(
                    "cannot read the operator token from {} (--token-file or MALLA_TOKEN_FILE): {e}",
                    file.display()
                )
            })?;
            return Ok(Some(Token {
                value,
                from: format!("{} (--token-file or MALLA_TOKEN_FILE)", file.display()),
            }));
        }
        if !is_loopback(authority) {
            return Ok(None);
        }
        let file = std::path::Path::new(DEFAULT_TOKEN_FILE);
        Ok(read_token(file).ok().map(|value| Token {
            value,
            from: format!("{DEFAULT_TOKEN_FILE} (the default data directory of `malla control`)"),
        }))
    }
}

fn read_token(file: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(file).map_err(|e| e.to_string())?;
    let value = text.trim();
    if value.is_empty() {
        return Err("the file is empty".into());
    }
    Ok(value.to_string())
}

/// Whether `HOST:PORT` names this machine: a loopback address or `localhost`.
fn is_loopback(authority: &str) -> bool {
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
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

/// Where the control plane is and how to speak to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// `HOST:PORT`, to connect to.
    pub authority: String,
    /// TLS (`HOST:PORT`, `https://`) or plaintext (`http://`).
    pub tls: bool,
}

/// Reads `HOST:PORT`, `https://HOST:PORT[/]` (TLS) or `http://HOST:PORT[/]` (plaintext).
pub fn parse_control(raw: &str) -> Result<Target, String> {
    let flag = control_source();
    let (rest, tls) = match raw.split_once("://") {
        Some(("https", rest)) => (rest, true),
        Some(("http", rest)) => (rest, false),
        Some((scheme, _)) => {
            return Err(format!(
                "{flag} {raw:?}: {scheme}:// is not a way to reach the control plane; give HOST:PORT or https://HOST:PORT (TLS), or http://HOST:PORT (plaintext)"
            ))
        }
        None => (raw, true),
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
            "{flag} {raw:?}: expected HOST:PORT, https://HOST:PORT or http://HOST:PORT (e.g. {DEFAULT_CONTROL})"
        ));
    }
    Ok(Target {
        authority: authority.to_string(),
        tls,
    })
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
    /// The TLS handshake failed: the control plane was not proven (or refused us).
    Tls { addr: String, reason: String },
    /// TLS, and no CA to verify the control plane with (no `--ca-file`, and no default).
    NoCa { addr: String, loopback: bool },
    /// The control plane refused the call for want of the operator token (401).
    Unauthenticated {
        addr: String,
        /// Where the token sent came from; `None`: none was sent.
        token_from: Option<String>,
    },
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
            CallError::Unauthenticated { .. } | CallError::Tls { .. } | CallError::NoCa { .. } => {
                false
            }
            CallError::Api { status, .. } => status.is_server_error(),
        }
    }

    /// The API's error code (`lease_not_found`, `not_found`...), when it answered one.
    pub fn code(&self) -> Option<&str> {
        match self {
            CallError::Api { code, .. } => Some(code),
            CallError::Unauthenticated { .. } => Some("unauthenticated"),
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
            CallError::Tls { addr, reason } => {
                write!(f, "the TLS connection to the control plane at {addr} failed: {reason}")
            }
            CallError::NoCa { addr, loopback } => f.write_str(&tls::no_ca_file(addr, *loopback)),
            CallError::Unauthenticated { addr, token_from } => {
                match token_from {
                    None => write!(f, "the control plane at {addr} requires the operator token and none was given"),
                    Some(from) => write!(f, "the control plane at {addr} refused the operator token from {from}: it is not the one in force (rotated, or another control plane's)"),
                }?;
                write!(
                    f,
                    "; pass it with --token TOKEN or MALLA_TOKEN, or --token-file FILE or MALLA_TOKEN_FILE: the control plane keeps it in DATA_DIR/operator.token on its machine, and `malla control` printed it at its first start (a new one: `malla operator-token rotate`)"
                )
            }
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
    token: Option<Token>,
    /// `None`: plaintext (`http://`); `Some(None)`: TLS without a CA to verify the control
    /// plane with, said once connected (an unreachable control plane is the news then).
    tls: Option<Option<tls::Tls>>,
    runtime: tokio::runtime::Runtime,
}

impl Client {
    pub fn new(arg: &ControlArg) -> anyhow::Result<Self> {
        let target = parse_control(&arg.control).map_err(anyhow::Error::msg)?;
        let authority = target.authority;
        let shown = if arg.control.contains("://") {
            arg.control.trim_end_matches('/').to_string()
        } else {
            authority.clone()
        };
        let token = arg.token(&authority)?;
        let tls = if target.tls {
            // A CA file given is read now: what is wrong with it is said first.
            tls::CaFile::find(arg.ca_file.as_deref(), is_loopback(&authority))
                .map(tls::Tls::load)
                .transpose()
                .map(Some)?
        } else {
            None
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Client {
            authority,
            shown,
            timeout: arg.request_timeout,
            token,
            tls,
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
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|e| CallError::Unreachable {
                addr: self.shown.clone(),
                reason: e.to_string(),
            })?;
        let tls = match &self.tls {
            None => return self.exchange(stream, method, path, body).await,
            Some(Some(tls)) => tls,
            Some(None) => {
                return Err(CallError::NoCa {
                    addr: self.shown.clone(),
                    loopback: is_loopback(&self.authority),
                })
            }
        };
        let connector = tokio_rustls::TlsConnector::from(tls.config());
        let stream = connector
            .connect(tls::server_name(&self.authority), stream)
            .await
            .map_err(|e| match tls::explain(&e, tls.ca(), control_source()) {
                tls::Failure::Closed(reason) => CallError::Transport {
                    addr: self.shown.clone(),
                    reason,
                },
                tls::Failure::Refused(reason) => CallError::Tls {
                    addr: self.shown.clone(),
                    reason,
                },
            })?;
        self.exchange(stream, method, path, body).await
    }

    /// One request and its answer on a new connection.
    async fn exchange<Io>(
        &self,
        io: Io,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, CallError>
    where
        Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let transport = |e: &dyn fmt::Display| CallError::Transport {
            addr: self.shown.clone(),
            reason: e.to_string(),
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| transport(&e))?;
        tokio::spawn(conn);
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, &self.authority)
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(token) = &self.token {
            req = req.header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", token.value),
            );
        }
        let req = req
            .body(Full::new(Bytes::from(payload)))
            .map_err(|e| transport(&e))?;
        let resp = sender.send_request(req).await.map_err(|e| transport(&e))?;
        let status = resp.status();
        // The operator token's refusal carries a challenge; `POST /v1/certificates`'s own
        // 401 (a workload's credential) does not.
        let challenged = resp.headers().contains_key(http::header::WWW_AUTHENTICATE);
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| transport(&e))?
            .to_bytes();
        let value: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).trim().to_string()));
        if status == StatusCode::UNAUTHORIZED && challenged {
            return Err(CallError::Unauthenticated {
                addr: self.shown.clone(),
                token_from: self.token.as_ref().map(|t| t.from.clone()),
            });
        }
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
    fn control_takes_host_port_or_a_url() {
        for (raw, want, tls) in [
            ("127.0.0.1:7780", "127.0.0.1:7780", true),
            ("https://127.0.0.1:7780", "127.0.0.1:7780", true),
            (
                "https://control.example:7780/",
                "control.example:7780",
                true,
            ),
            ("http://127.0.0.1:7780", "127.0.0.1:7780", false),
            ("http://127.0.0.1:7780/", "127.0.0.1:7780", false),
            ("localhost:80", "localhost:80", true),
            ("[::1]:7780", "[::1]:7780", true),
            ("http://[::1]:7780", "[::1]:7780", false),
        ] {
            assert_eq!(
                parse_control(raw),
                Ok(Target {
                    authority: want.into(),
                    tls
                }),
                "{raw}"
            );
        }
        for raw in [
            "",
            "127.0.0.1",
            "http://",
            "https://",
            "ftp://x:1",
            "x:y",
            "http://x:1/api",
            "https://x:1/api",
            ":80",
        ] {
            let err = parse_control(raw).unwrap_err();
            assert!(err.starts_with("--control "), "{raw}: {err}");
        }
    }
}

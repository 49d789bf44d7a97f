//! A small client for the control plane's HTTP/JSON API: one HTTP/1.1 connection per
//! request (so a test never depends on keep-alive), every wait bounded by
//! [`crate::client::TIMEOUT`].
//!
//! [`Api::request`] sends any bytes and returns the status and the parsed JSON, for tests of
//! bad input; the typed helpers ([`Api::register`], [`Api::instance_ids`]...) assert that
//! the call succeeded and return what the test wants to look at.
//!
//! Every request goes over TLS and carries the operator token when the client was given
//! them ([`Api::with_credentials_of`]: the trust bundle and the token a control plane
//! keeps in its data directory, what [`crate::control::TestControl::api`] gives), so tests
//! of the API need no step for either.

use std::{net::SocketAddr, path::Path, sync::Arc};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

use crate::{client::within, BoxError};

/// The HTTP API of one control plane.
#[derive(Clone)]
pub struct Api {
    addr: SocketAddr,
    /// Sent as `Authorization: Bearer TOKEN` on every request.
    token: Option<Arc<str>>,
    /// TLS verified with the control plane's trust bundle; none: plaintext.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("addr", &self.addr)
            .field("token", &self.token.is_some())
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// An answer: the status, the body parsed as JSON (`Value::Null` when it is not JSON) and
/// the raw body.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub json: Value,
    pub body: Bytes,
    pub content_type: Option<String>,
    pub headers: http::HeaderMap,
}

impl Reply {
    /// The JSON body of a 200 answer; panics with the answer otherwise.
    #[track_caller]
    pub fn ok(self) -> Value {
        assert_eq!(self.status, 200, "expected 200, got {self}");
        self.json
    }

    /// `error.code` of an error answer (empty when absent).
    pub fn code(&self) -> &str {
        self.json["error"]["code"].as_str().unwrap_or_default()
    }

    /// `error.message` of an error answer (empty when absent).
    pub fn message(&self) -> &str {
        self.json["error"]["message"].as_str().unwrap_or_default()
    }

    /// Asserts the error shape: this status, a JSON body `{"error": {"code": CODE,
    /// "message": M}}` with a non-empty message, served as `application/json`; returns M.
    #[track_caller]
    pub fn error(&self, status: u16, code: &str) -> &str {
        assert_eq!(self.status, status, "wrong status in {self}");
        assert_eq!(self.code(), code, "wrong error code in {self}");
        assert!(!self.message().is_empty(), "no error message in {self}");
        assert_eq!(
            self.content_type.as_deref(),
            Some("application/json"),
            "an error must be JSON: {self}"
        );
        self.message()
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HTTP {} {}",
            self.status,
            String::from_utf8_lossy(&self.body)
        )
    }
}

impl Api {
    /// A client that sends no operator token (enough for `/live`, `/ready`, `/metrics`,
    /// `GET /v1/identity` and `POST /v1/certificates`).
    pub fn new(addr: SocketAddr) -> Api {
        Api {
            addr,
            token: None,
            tls: None,
        }
    }

    /// The same client sending `token` as the operator token.
    pub fn with_token(&self, token: &str) -> Api {
        Api {
            token: Some(token.into()),
            ..self.clone()
        }
    }

    /// The same client over TLS, verifying the control plane with the PEM trust bundle in
    /// `bundle`.
    pub fn with_trust(&self, bundle: &Path) -> Api {
        self.with_tls(bundle, None)
    }

    /// The same client over TLS, verifying the control plane with `bundle` and presenting
    /// `svid` when given (a workload's certificate).
    pub fn with_tls(&self, bundle: &Path, svid: Option<&malla_proxy::identity::Svid>) -> Api {
        let config = super::tls::client_config(bundle, svid, b"http/1.1")
            .unwrap_or_else(|e| panic!("the trust bundle {}: {e}", bundle.display()));
        Api {
            tls: Some(config),
            ..self.clone()
        }
    }

    /// The same client with the credentials a control plane keeps in its data directory
    /// `dir`, read now: its trust bundle (TLS) and its operator token, each when its file
    /// exists.
    pub fn with_credentials_of(&self, dir: &Path) -> Api {
        let bundle = super::tls::bundle_path(dir);
        let api = if bundle.exists() {
            self.with_trust(&bundle)
        } else {
            self.clone()
        };
        match operator_token(dir) {
            Some(token) => api.with_token(&token),
            None => Api { token: None, ..api },
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends a request; `Err` when the control plane cannot be reached or the connection
    /// breaks (what a crash looks like to a client).
    pub async fn try_request(
        &self,
        method: Method,
        path: &str,
        body: impl Into<Bytes>,
    ) -> Result<Reply, BoxError> {
        let body: Bytes = body.into();
        let (mut sender, conn) = match &self.tls {
            Some(config) => {
                let stream = super::tls::connect(self.addr, config.clone()).await?;
                let (sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                (sender, tokio::spawn(async move { conn.await.map(drop) }))
            }
            None => {
                let stream = TcpStream::connect(self.addr).await?;
                let (sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                (sender, tokio::spawn(async move { conn.await.map(drop) }))
            }
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, self.addr.to_string());
        if !body.is_empty() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        if let Some(token) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let resp = sender.send_request(req.body(Full::new(body))?).await?;
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await?.to_bytes();
        conn.abort();
        let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Ok(Reply {
            status,
            json,
            body,
            content_type,
            headers,
        })
    }

    /// Sends a request; panics when there is no answer.
    pub async fn request(&self, method: Method, path: &str, body: impl Into<Bytes>) -> Reply {
        let what = format!("{method} {path}");
        match within(&what, self.try_request(method.clone(), path, body)).await {
            Ok(reply) => reply,
            Err(e) => panic!("{what} at {}: {e}", self.addr),
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.request(Method::GET, path, Bytes::new()).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> Reply {
        self.request(Method::PUT, path, body.to_string()).await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        self.request(Method::DELETE, path, Bytes::new()).await
    }

    /// `PUT /v1/services/SERVICE/instances/ID`; returns `{lease, ttl_seconds, revision}`.
    pub async fn register(&self, service: &str, id: &str, registration: &Value) -> Value {
        self.put(
            &format!("/v1/services/{service}/instances/{id}"),
            registration,
        )
        .await
        .ok()
    }

    /// `DELETE /v1/services/SERVICE/instances/ID`.
    pub async fn deregister(&self, service: &str, id: &str) -> Value {
        self.delete(&format!("/v1/services/{service}/instances/{id}"))
            .await
            .ok()
    }

    /// `PUT /v1/services/SERVICE` with a spec (`{"health_check": ...}` or `{}`).
    pub async fn put_service(&self, service: &str, spec: &Value) -> Value {
        self.put(&format!("/v1/services/{service}"), spec)
            .await
            .ok()
    }

    /// `PUT /v1/leases/LEASE/keepalive`.
    pub async fn keepalive(&self, lease: u64) -> Reply {
        self.request(
            Method::PUT,
            &format!("/v1/leases/{lease}/keepalive"),
            Bytes::new(),
        )
        .await
    }

    /// `GET /v1/services/SERVICE/instances?selector=SELECTOR` (no selector when empty) with
    /// `extra` query parameters appended (`"serving=true"`).
    pub async fn list(&self, service: &str, selector: &str, extra: &str) -> Reply {
        let mut query = Vec::new();
        if !selector.is_empty() {
            query.push(format!("selector={}", encode(selector)));
        }
        if !extra.is_empty() {
            query.push(extra.to_string());
        }
        let mut path = format!("/v1/services/{service}/instances");
        if !query.is_empty() {
            path = format!("{path}?{}", query.join("&"));
        }
        self.get(&path).await
    }

    /// The instances (JSON objects) of `service` that match `selector`; the service must
    /// exist.
    pub async fn instances(&self, service: &str, selector: &str) -> Vec<Value> {
        let reply = self.list(service, selector, "").await.ok();
        reply["instances"].as_array().cloned().unwrap_or_default()
    }

    /// The ids of the instances of `service` that match `selector`, sorted; empty when the
    /// service does not exist.
    pub async fn instance_ids(&self, service: &str, selector: &str) -> Vec<String> {
        let reply = self.list(service, selector, "").await;
        if reply.status == 404 {
            return Vec::new();
        }
        ids(&reply.ok())
    }

    /// The health (`unknown`, `healthy`, `unhealthy`) of one instance; `None` when absent.
    pub async fn health(&self, service: &str, id: &str) -> Option<String> {
        let reply = self.list(service, "", "").await;
        if reply.status == 404 {
            return None;
        }
        reply.ok()["instances"]
            .as_array()?
            .iter()
            .find(|i| i["id"] == id)
            .and_then(|i| i["health"].as_str())
            .map(str::to_string)
    }
}

/// The operator token a control plane keeps in its data directory `dir`, if any.
pub fn operator_token(dir: &Path) -> Option<String> {
    let path = dir.join(malla_control::operator::FILE_NAME);
    let token = std::fs::read_to_string(path).ok()?;
    Some(token.trim().to_string()).filter(|t| !t.is_empty())
}

/// The sorted ids of `answer["instances"]`.
pub fn ids(answer: &Value) -> Vec<String> {
    let mut ids: Vec<String> = answer["instances"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|i| i["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

/// Percent-encodes a query value or path segment (everything but `A-Za-z0-9-._~`).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

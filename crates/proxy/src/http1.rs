//! HTTP/1.1, owned end to end.
//!
//! This is the proxy's hot path, so it is written the way Pingora writes its HTTP/1
//! sessions rather than as a hyper server feeding a pooled client: one task per client
//! connection reads request heads into a reused buffer, parses them with `httparse`,
//! rewrites them into a reused output buffer and relays them over an upstream connection
//! that the task *owns* for as long as the balancer keeps choosing the same endpoint (one
//! pool checkout per endpoint switch, not per request). Bodies stream through fixed-size
//! buffers ([`body`]). In steady state a request costs two reads and two writes and no
//! allocation. `shared/PERF.md` has the measurements behind this choice.
//!
//! Per request:
//!
//! ```text
//! read head (idle / head timeouts, size limits) -> parse + validate + rewrite (head.rs)
//!   -> route (Host) -> Call::admit (faults, rate limits, max_requests)
//!   -> Call::run: the attempts (attempt.rs moves one attempt's bytes:
//!        connection (held | this worker's pool | connect) -> send head (+ body)
//!        -> response head, 1xx relayed)
//!   -> rewrite + send the response head -> relay the response body
//!   -> keep both connections, or close what can no longer be trusted
//! ```
//!
//! What is retried, when, and what the breaker learns is decided by [`crate::call`], the
//! same for every protocol; this module only frames bytes.
//!
//! Requests on one connection are handled strictly in order, so pipelined requests get
//! their responses in order and a request is never read before the previous response is
//! complete. Errors before the response head reach the client as a response from
//! [`ProxyError`]; after it, the only honest signal left is closing the connection.

mod attempt;
pub mod body;
pub mod head;
#[doc(hidden)]
pub mod invariants;
pub mod pool;

use std::{
    future::Future,
    net::SocketAddr,
    pin::{pin, Pin},
    sync::Arc,
    time::Duration,
};

use bytes::{Buf, BytesMut};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    time::Instant,
};
use tracing::debug;

use self::{
    attempt::{Attempts, HeadTimer, Relay, UpConn},
    head::{BodyKind, Parsed, RequestInfo},
};
use crate::{
    authz,
    call::{Answer, Call},
    config::Limits,
    error::ProxyError,
    listener::ListenerCtx,
    stream::Stream,
    upstream::Upstream,
};

/// Size of the per-connection read buffers.
pub const READ_BUF: usize = 16 * 1024;

/// What the connection loop does after one exchange.
enum Next {
    KeepAlive,
    Close,
    /// The upstream answered `101 Switching Protocols`: relay bytes both ways.
    Tunnel(UpConn),
}

/// Per-connection state reused across requests.
struct Session<'a> {
    ctx: &'a ListenerCtx,
    limits: &'a Limits,
    client_addr: head::ClientAddr,
    /// The rewritten request head (kept until the response head, for a retry).
    req_head: Vec<u8>,
    /// The rewritten response head.
    resp_head: Vec<u8>,
    /// The upstream connection this client connection holds between requests.
    held: Option<UpConn>,
    /// Bounds the wait for each response head.
    head_timer: HeadTimer,
}

pub(crate) async fn serve(
    mut client: Stream,
    mut buf: BytesMut,
    peer: SocketAddr,
    identity: Option<&malla_core::SpiffeId>,
    ctx: &Arc<ListenerCtx>,
) {
    let mut s = Session {
        ctx,
        limits: &ctx.shared.config.limits,
        client_addr: head::ClientAddr::new(peer.ip(), identity),
        req_head: Vec::with_capacity(1024),
        resp_head: Vec::with_capacity(1024),
        held: None,
        head_timer: HeadTimer::new(),
    };
    // One drain waiter and one idle timer for the connection's lifetime, re-armed per
    // request: registering a fresh waiter (a mutex on the shared watch) and a fresh timer
    // for every request is measurable on the hot path.
    let mut drain = ctx.shared.drain_signal();
    let mut drained = pin!(drain.wait_for(|d| *d));
    let mut timer = pin!(tokio::time::sleep(
        ctx.shared.config.limits.client_idle_timeout
    ));
    loop {
        let info = match s
            .read_request(&mut client, &mut buf, drained.as_mut(), timer.as_mut())
            .await
        {
            Ok(Some(info)) => info,
            Ok(None) => break,
            Err(err) => {
                debug!(error = %err, %peer, "rejecting request");
                let _ = client.write_all(&err.http1_response(true, None)).await;
                linger_close(&mut client).await;
                break;
            }
        };
        let upstream = match authorize(ctx, identity, &buf, &info)
            .and_then(|()| ctx.route(info.host.map(|(a, b)| &buf[a..b])))
        {
            Ok(u) => u,
            Err(err) => {
                buf.advance(info.head_len);
                let close = info.body != BodyKind::Empty || !info.keep_alive;
                let _ = client.write_all(&err.http1_response(close, None)).await;
                if close {
                    break;
                }
                continue;
            }
        };
        match s.exchange(&mut client, &mut buf, &info, upstream).await {
            Next::KeepAlive if !ctx.shared.is_draining() => {}
            Next::KeepAlive | Next::Close => break,
            Next::Tunnel(up) => {
                tunnel(client, buf, up).await;
                return;
            }
        }
    }
    if let Some(up) = s.held.take() {
        up.release();
    }
}

/// The inbound authorization stage for one request (a no-op elsewhere, and while no
/// policy is in force).
fn authorize(
    ctx: &ListenerCtx,
    identity: Option<&malla_core::SpiffeId>,
    buf: &[u8],
    info: &RequestInfo,
) -> Result<(), ProxyError> {
    let Some(authorizer) = ctx.enforcing() else {
        return Ok(());
    };
    let (method, content_type) = head::method_and_content_type(&buf[..info.head_len]);
    let target = info.path(buf);
    let call = authz::Inbound::http(
        identity,
        ctx.port,
        authz::HttpVersion::Http1,
        method,
        &target,
        content_type,
    );
    crate::inbound::authorize(authorizer, &call)
}

impl Session<'_> {
    /// Reads and parses the next request head. `None`: the client closed, idled out, or the
    /// proxy is draining between requests.
    async fn read_request(
        &mut self,
        client: &mut Stream,
        buf: &mut BytesMut,
        mut drained: Pin<&mut impl Future>,
        mut timer: Pin<&mut tokio::time::Sleep>,
    ) -> Result<Option<RequestInfo>, ProxyError> {
        let max_headers = self.limits.max_headers.min(head::MAX_HEADERS);
        let mut head_deadline = None;
        loop {
            if !buf.is_empty() {
                match head::parse_request(buf, max_headers, &self.client_addr, &mut self.req_head)?
                {
                    Parsed::Complete(info) if info.head_len <= self.limits.max_head_bytes => {
                        return Ok(Some(info))
                    }
                    Parsed::Complete(_) => {
                        return Err(ProxyError::HeadTooLarge {
                            limit: self.limits.max_head_bytes,
                        })
                    }
                    Parsed::Partial if buf.len() >= self.limits.max_head_bytes => {
                        return Err(ProxyError::HeadTooLarge {
                            limit: self.limits.max_head_bytes,
                        })
                    }
                    Parsed::Partial => {}
                }
            }
            let deadline = if buf.is_empty() {
                Instant::now() + self.limits.client_idle_timeout
            } else {
                // The whole head must arrive within the head timeout, however it trickles.
                *head_deadline.get_or_insert_with(|| Instant::now() + self.limits.head_timeout)
            };
            // Re-arming a timer costs a timer-wheel update: extend the idle timer only when
            // it falls short by more than a slack (an idle close may come up to 1 s, or a
            // quarter of the idle timeout, late). An expired timer is always short.
            let slack = (self.limits.client_idle_timeout / 4).min(Duration::from_secs(1));
            let current = timer.deadline();
            if current > deadline || current + slack < deadline {
                timer.as_mut().reset(deadline);
            }
            tokio::select! {
                biased;
                read = body::fill(client, buf) => match read {
                    Ok(0) | Err(_) => return Ok(None),
                    Ok(_) => {}
                },
                _ = drained.as_mut(), if buf.is_empty() => return Ok(None),
                _ = timer.as_mut() => {
                    return if buf.is_empty() {
                        Ok(None)
                    } else {
                        Err(ProxyError::HeadTimeout(self.limits.head_timeout))
                    };
                }
            }
        }
    }

    /// One request/response exchange with an upstream: admitted by the call driver, then
    /// its attempts, then the answer relayed.
    async fn exchange(
        &mut self,
        client: &mut Stream,
        buf: &mut BytesMut,
        req: &RequestInfo,
        upstream: &Upstream,
    ) -> Next {
        let res = upstream.resilience_full();
        // The body is "complete" when it is already in the buffer: it goes out with the
        // head in one write, and the request can be sent again (a retry, or a dead pooled
        // connection).
        let in_buf = (buf.len() - req.head_len) as u64;
        let mut complete_len = match req.body {
            BodyKind::Empty => Some(0),
            BodyKind::Length(n) if n <= in_buf => Some(n as usize),
            _ => None,
        };
        let kind = (req.idempotent, false, complete_len.is_none());
        let mut call = Call::new(upstream, &res, req.timeout, kind, Instant::now);
        let admitted = call.admit(Some(&req.path(buf))).await;
        buf.advance(req.head_len);
        let _request = match admitted {
            Ok(slot) => slot,
            Err(err) => {
                // A body already here is skipped, so the connection can go on.
                if let Some(n) = complete_len {
                    buf.advance(n);
                }
                let skipped = complete_len.is_some();
                return self.fail(client, req, upstream, err, skipped).await;
            }
        };

        // A small body still on its way is read first when the request may be retried,
        // so that it can be replayed.
        if let BodyKind::Length(n) = req.body {
            if complete_len.is_none()
                && call.may_resend()
                && n <= res.policy.retries.max_replay_bytes
                && !req.expect_continue
            {
                complete_len = self.read_body(client, buf, n as usize).await;
                if complete_len.is_none() {
                    return Next::Close;
                }
                call.body_received();
            }
        }
        let head_end = self.req_head.len();
        if let Some(n) = complete_len {
            self.req_head.extend_from_slice(&buf[..n]);
            buf.advance(n);
        }
        let draining = self.ctx.shared.is_draining();
        let buffered = complete_len.is_some();
        let mut attempts = Attempts::new(self, client, buf, req, &call, head_end, buffered);
        let answer = call.run(&mut attempts).await;
        match answer {
            Answer::Response(resp, claim) => {
                let relay = Relay::new(resp, req, draining);
                if relay.switching() {
                    return self.switch_protocols(client, relay.into_conn()).await;
                }
                let relayed = relay.finish(client, &mut self.resp_head).await;
                // In flight until the body is relayed, as P2C's load counts it.
                drop(claim);
                self.keep(relayed)
            }
            // A buffered body went with the head: nothing of it is left unread.
            Answer::Error(err) => self.fail(client, req, upstream, err, buffered).await,
            Answer::Abandoned(err) => {
                debug!(error = %err, "closing: part of the response was sent");
                Next::Close
            }
        }
    }

    /// Keeps the upstream connection of a relayed exchange if it can carry another request.
    fn keep(&mut self, (up, keep_alive): (Option<UpConn>, bool)) -> Next {
        if let Some(mut up) = up {
            up.last_used = Instant::now();
            self.held = Some(up);
        }
        if keep_alive {
            Next::KeepAlive
        } else {
            Next::Close
        }
    }

    /// Reads the rest of a `Content-Length` body into `buf` (at most the head timeout);
    /// `None` when the client went away or was too slow. The buffer grows as the bytes
    /// arrive, never ahead of them: a `Content-Length` is a claim, not an allocation.
    async fn read_body(
        &mut self,
        client: &mut Stream,
        buf: &mut BytesMut,
        n: usize,
    ) -> Option<usize> {
        let deadline = Instant::now() + self.limits.head_timeout;
        while buf.len() < n {
            match tokio::time::timeout_at(deadline, body::fill(client, buf)).await {
                Ok(Ok(read)) if read > 0 => {}
                _ => return None,
            }
        }
        Some(n)
    }

    /// Switches to a tunnel after `101 Switching Protocols`.
    async fn switch_protocols(&mut self, client: &mut Stream, up: UpConn) -> Next {
        head::finish_response(&mut self.resp_head, false, false);
        if client.write_all(&self.resp_head).await.is_err() {
            return Next::Close;
        }
        Next::Tunnel(up)
    }

    /// Answers the client with `err` before any response byte was sent; `body_consumed`:
    /// nothing of the request is left unread on the connection.
    async fn fail(
        &mut self,
        client: &mut Stream,
        req: &RequestInfo,
        upstream: &Upstream,
        err: ProxyError,
        body_consumed: bool,
    ) -> Next {
        debug!(error = %err, upstream = upstream.name(), "answering with an error");
        upstream.error(&err);
        // A request body the proxy did not consume leaves the connection unusable.
        let close = !req.keep_alive || !body_consumed || self.ctx.shared.is_draining();
        let response = err.http1_response(close, self.ctx.relay_mark(upstream));
        if client.write_all(&response).await.is_err() || close {
            return Next::Close;
        }
        Next::KeepAlive
    }
}

/// Relays bytes both ways after a protocol switch until both sides are done.
async fn tunnel(mut client: Stream, client_buf: BytesMut, mut up: UpConn) {
    if !client_buf.is_empty() && up.stream.write_all(&client_buf).await.is_err() {
        return;
    }
    if !up.buf.is_empty() {
        let pending = std::mem::take(&mut up.buf);
        if client.write_all(&pending).await.is_err() {
            return;
        }
    }
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut up.stream).await {
        debug!(error = %e, "tunnel ended with an error");
    }
}

/// Closes a connection whose client may still be sending (an early response or an
/// error): shut our side, then read and discard for a short, bounded while so the
/// client receives the response instead of a reset.
async fn linger_close(client: &mut Stream) {
    let _ = client.shutdown().await;
    let mut sink = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(1);
    for _ in 0..256 {
        match tokio::time::timeout_at(deadline, client.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
    }
}

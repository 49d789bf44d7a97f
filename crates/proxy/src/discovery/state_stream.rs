//! Following a stream of whole states from the control plane: a service's resilience
//! policy ([`super::policy`]), this sidecar's authorization policy ([`super::authz`]).
//!
//! Every message of such a stream is the whole state, and the first message of a new stream
//! is the current one, so a reconnection needs no bookkeeping: the caller puts a state in
//! force unless its version already is (resuming by version). While the control plane is
//! away the state in force stays, as the endpoints do; the stream is opened again with
//! exponential backoff and full jitter ([`super::backoff`]).

use std::{
    future::Future,
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::Duration,
};

use tracing::{debug, warn};

use super::{backoff::Backoff, get_error, set_error, RETRY_BASE, RETRY_MAX};

/// Longest wait for a new stream's first message.
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// One stream's connection, for `/config`.
#[derive(Default)]
pub(crate) struct StreamStatus {
    connected: AtomicBool,
    /// Why the stream broke, or why the last state was refused.
    last_error: Mutex<Option<String>>,
}

impl StreamStatus {
    pub(super) fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub(super) fn last_error(&self) -> Option<String> {
        get_error(&self.last_error)
    }

    pub(super) fn set_error(&self, error: Option<String>) {
        set_error(&self.last_error, error);
    }
}

#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("{:?}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    #[error("the control plane ended the stream")]
    Ended,
    #[error("no state within {START_TIMEOUT:?}")]
    Timeout,
}

/// What one stream follows, for its logs: `what` (`policy`) of `of` (`upstream quote`),
/// and the version in force.
pub(super) struct Subject<'a> {
    pub what: &'a str,
    pub of: &'a str,
    pub in_force: &'a (dyn Fn() -> Option<u64> + Send + Sync),
}

/// Follows the stream that `open` starts, forever, giving every message to `apply`.
pub(super) async fn follow<M, O, F>(
    subject: Subject<'_>,
    status: &StreamStatus,
    mut open: O,
    mut apply: impl FnMut(M),
) where
    O: FnMut() -> F,
    F: Future<Output = Result<tonic::Response<tonic::Streaming<M>>, tonic::Status>>,
{
    let mut backoff = Backoff::new(RETRY_BASE, RETRY_MAX);
    let mut streams = 0u64;
    loop {
        let before = streams;
        let error = once(status, &mut open, &mut apply, &mut backoff, &mut streams).await;
        status.connected.store(false, Ordering::Relaxed);
        status.set_error(Some(error.to_string()));
        let wait = backoff.next_delay();
        let (what, of, version) = (subject.what, subject.of, (subject.in_force)());
        if streams > before {
            // This stream was up: losing it is news. Failed attempts after it are not.
            warn!(watch = %of, %error, retry_in = ?wait, ?version, "lost the {what} stream; keeping the {what} in force");
        } else {
            debug!(watch = %of, %error, retry_in = ?wait, "cannot watch the {what}; retrying");
        }
        tokio::time::sleep(wait).await;
    }
}

/// One stream, from the request to its end.
async fn once<M, O, F>(
    status: &StreamStatus,
    open: &mut O,
    apply: &mut impl FnMut(M),
    backoff: &mut Backoff,
    streams: &mut u64,
) -> StreamError
where
    O: FnMut() -> F,
    F: Future<Output = Result<tonic::Response<tonic::Streaming<M>>, tonic::Status>>,
{
    // The stream and its first state must come within a bound: a control plane that
    // accepts connections but does not answer is as good as gone.
    let start = async {
        let mut stream = open().await?.into_inner();
        let first = stream.message().await?;
        Ok::<_, tonic::Status>((stream, first))
    };
    let (mut stream, first) = match tokio::time::timeout(START_TIMEOUT, start).await {
        Ok(Ok(started)) => started,
        Ok(Err(status)) => return status.into(),
        Err(_) => return StreamError::Timeout,
    };
    let Some(first) = first else {
        return StreamError::Ended;
    };
    *streams += 1;
    status.connected.store(true, Ordering::Relaxed);
    status.set_error(None);
    backoff.reset();
    apply(first);
    loop {
        match stream.message().await {
            Ok(Some(message)) => apply(message),
            Ok(None) => return StreamError::Ended,
            Err(status) => return status.into(),
        }
    }
}

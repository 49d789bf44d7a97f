//! Keeping this proxy's instance in the registry: register, heartbeat every TTL/3,
//! register again when the lease is lost (or holds its instance no more), deregister on
//! drain.
//!
//! Every call goes on the writes channel of the certificate in force
//! ([`Channels::writes`]): the control plane accepts them from a certificate of this
//! instance's service.

use std::{sync::atomic::Ordering, sync::Arc, time::Duration};

use malla_api::{pb, Registration, RegistryClient};
use tokio::{sync::mpsc, time::timeout};
use tonic::{transport::Channel, Code};
use tracing::{debug, info, warn};

use super::{
    backoff::Backoff, channel::Channels, set_error, RegistrationStatus, RETRY_BASE, RETRY_MAX,
    RPC_TIMEOUT,
};
use crate::identity::IdentityState;

/// This sidecar's identity, as registering sees it.
pub(super) struct Identity {
    /// Register once this identity holds a certificate.
    pub ready: Option<Arc<IdentityState>>,
    /// Whether the sidecar has an identity at all (a join token or `identity_dir`).
    pub configured: bool,
    /// Whether the control plane is reached over TLS (plaintext carries no certificate).
    pub tls: bool,
}

impl Identity {
    /// What to do about a refusal for want of a certificate.
    fn hint(&self, service: &malla_core::ServiceName) -> Option<String> {
        if !self.configured {
            Some(format!(
                "this sidecar has no certificate to register with: give it a join token of {service} \
                 with MALLA_JOIN_TOKEN or --join-token-file, made by `malla token create --service {service}`"
            ))
        } else if !self.tls {
            Some(
                "over plaintext (http://) this sidecar cannot present its certificate: reach the control plane \
                 over TLS, HOST:PORT or https://HOST:PORT with --control-ca"
                    .to_string(),
            )
        } else {
            None
        }
    }
}

type Deregister = mpsc::UnboundedReceiver<std::sync::mpsc::SyncSender<()>>;

/// A unary call under [`RPC_TIMEOUT`], its failure as text.
async fn call<T>(
    what: &str,
    future: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, (Option<Code>, String)> {
    match timeout(RPC_TIMEOUT, future).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err((
            Some(status.code()),
            format!("{what}: {:?}: {}", status.code(), status.message()),
        )),
        Err(_) => Err((None, format!("{what}: no answer within {RPC_TIMEOUT:?}"))),
    }
}

/// The registry client of the certificate in force.
fn client(channels: &Channels) -> RegistryClient<Channel> {
    RegistryClient::new(channels.writes())
}

pub(super) async fn run(
    channels: Arc<Channels>,
    registration: Registration,
    status: Arc<RegistrationStatus>,
    identity: Identity,
    mut deregister: Deregister,
) {
    let request = pb::RegisterRequest::from(&registration);
    let instance = &registration.instance;
    if let Some(state) = &identity.ready {
        if state.current().is_none() {
            set_error(
                &status.last_error,
                Some("waiting for this sidecar's certificate before registering (see control.identity)".into()),
            );
            info!("registering once this sidecar has its certificate");
        }
        tokio::select! {
            // Nothing registered yet: nothing to deregister.
            done = deregister.recv() => {
                if let Some(done) = done {
                    let _ = done.send(());
                }
                return;
            }
            () = state.issued() => {}
        }
    }
    let ttl = registration.ttl.unwrap_or(Duration::from_secs(10));
    let mut backoff = Backoff::new(RETRY_BASE, RETRY_MAX);
    loop {
        // Register, retrying until it works, or until the proxy drains.
        let lease = loop {
            let mut registry = client(&channels);
            let outcome = tokio::select! {
                done = deregister.recv() => {
                    finish(&channels, &registration, &status, done).await;
                    return;
                }
                outcome = call("register", registry.register(request.clone())) => outcome,
            };
            match outcome {
                Ok(registered) => break registered,
                Err((code, mut error)) => {
                    let wait = backoff.next_delay();
                    let refused =
                        matches!(code, Some(Code::Unauthenticated | Code::PermissionDenied));
                    let hint = match refused {
                        true => identity.hint(&instance.service),
                        false => None,
                    };
                    if let Some(hint) = hint {
                        error.push_str(&format!(" ({hint})"));
                    }
                    // Bad input or a refusal will not get better by itself: say so loudly,
                    // and keep trying slowly (an operator may fix either side).
                    if code == Some(Code::InvalidArgument) || refused {
                        warn!(%error, "the control plane rejects this instance's registration");
                    } else {
                        debug!(%error, retry_in = ?wait, "registration failed; retrying");
                    }
                    set_error(&status.last_error, Some(error));
                    tokio::select! {
                        done = deregister.recv() => {
                            finish(&channels, &registration, &status, done).await;
                            return;
                        }
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        };
        status.lease.store(lease.lease, Ordering::Relaxed);
        status.metrics.registered.set(1);
        status.metrics.registrations.inc();
        set_error(&status.last_error, None);
        backoff.reset();
        info!(service = %instance.service, id = %instance.id, address = %instance.socket_addr(), lease = lease.lease, ttl_seconds = lease.ttl_seconds, "registered");

        // Heartbeats every third of the TTL; sooner retries (with backoff) when one fails.
        let ttl = match lease.ttl_seconds {
            0 => ttl,
            s => Duration::from_secs(u64::from(s)),
        };
        let beat = ttl / 3;
        let mut wait = beat;
        let mut failing = false;
        loop {
            tokio::select! {
                done = deregister.recv() => {
                    finish(&channels, &registration, &status, done).await;
                    return;
                }
                _ = tokio::time::sleep(wait) => {}
            }
            match call(
                "heartbeat",
                client(&channels).heartbeat(pb::HeartbeatRequest { lease: lease.lease }),
            )
            .await
            {
                Ok(_) => {
                    if failing {
                        info!(lease = lease.lease, "heartbeats resumed");
                        set_error(&status.last_error, None);
                    }
                    failing = false;
                    wait = beat;
                    backoff.reset();
                }
                // Lost: gone (`NOT_FOUND`), or, to this sidecar's certificate, holding none
                // of its instances any more (`PERMISSION_DENIED`: the instance was removed
                // and the control plane tells no workload about leases not its own).
                Err((Some(Code::NotFound | Code::PermissionDenied), error)) => {
                    warn!(lease = lease.lease, %error, "the lease was lost (expired, revoked or its instance removed); registering again");
                    set_error(&status.last_error, Some(error));
                    status.lease.store(0, Ordering::Relaxed);
                    status.metrics.registered.set(0);
                    break;
                }
                Err((_, error)) => {
                    wait = backoff.next_delay().min(beat);
                    if !failing {
                        warn!(%error, "heartbeat failed; the lease holds until its TTL runs out, retrying");
                    }
                    failing = true;
                    set_error(&status.last_error, Some(error));
                }
            }
        }
    }
}

/// Deregisters (when asked to: `done` is `Some`) and acknowledges; stops heartbeating
/// either way.
async fn finish(
    channels: &Channels,
    registration: &Registration,
    status: &RegistrationStatus,
    done: Option<std::sync::mpsc::SyncSender<()>>,
) {
    let Some(done) = done else { return };
    let instance = &registration.instance;
    let request = pb::DeregisterRequest {
        service: instance.service.to_string(),
        id: instance.id.clone(),
    };
    match call("deregister", client(channels).deregister(request)).await {
        Ok(_) | Err((Some(Code::NotFound), _)) => {
            info!(service = %instance.service, id = %instance.id, "deregistered");
        }
        Err((_, error)) => {
            warn!(%error, "deregistration failed; the lease will expire by itself");
        }
    }
    status.lease.store(0, Ordering::Relaxed);
    status.metrics.registered.set(0);
    let _ = done.send(());
}

//! Getting and renewing this sidecar's certificate ([`crate::identity`]).
//!
//! A key is generated once, at start (ECDSA P-256, aws-lc-rs), and one CSR made for it:
//! the CA takes only the CSR's key, so the same request serves the first certificate and
//! every renewal. The first `Certify` carries the join token; later ones the current
//! certificate, whose key signed the CSR. Renewal starts between 65 % and 75 % of the
//! certificate's remaining life when it arrives (jittered, so that sidecars started together do not renew together)
//! and retries with backoff until it succeeds; the current certificate stays in use
//! meanwhile, so a control-plane outage shorter than the remaining ~30 % costs nothing.
//!
//! The trust bundle comes with each certificate and is in force with it: during a root
//! rotation the CA adds the new root to the bundle one certificate lifetime before it
//! signs with it (`malla_control::identity::ca::rotation`), so renewing is all a sidecar
//! does to follow one.
//!
//! The first `Certify` goes on the channel that needs no credential; renewals on the
//! writes channel, which presents the certificate being renewed ([`Channels::writes`]).
//!
//! With `[control] identity_dir` the key (0600), the certificate chain and the trust
//! bundle are kept there ([`stored`]): a restarted sidecar puts a still-valid certificate
//! in force at once and renews with it, needing no new join token.

mod stored;

pub(crate) use stored::kept_bundle;

use std::{path::PathBuf, sync::Arc, time::SystemTime};

use malla_api::{identity_pb as pb, IdentityClient};
use malla_core::SpiffeId;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use tonic::{transport::Channel, Code};
use tracing::{error, info, warn};

use super::{backoff::Backoff, channel::Channels, RETRY_MAX, RPC_TIMEOUT};
use crate::{
    identity::{from_unix_ms, IdentityState, Svid},
    metrics::IdentityMetrics,
};

/// Where in a certificate's life renewal starts: uniformly within this range.
const RENEW_FROM: f64 = 0.65;
const RENEW_TO: f64 = 0.75;
/// After a refusal, the next request waits at least this long.
const REFUSED_RETRY: std::time::Duration = std::time::Duration::from_secs(30);
/// The first retry after a failed request waits at most this long.
const RETRY_BASE: std::time::Duration = std::time::Duration::from_secs(1);

/// How this sidecar proves its identity: a join token, and/or a directory where its key
/// and certificate outlive the process (`[control] identity_dir`).
#[derive(Clone, Debug)]
pub(crate) struct Credentials {
    pub join_token: Option<String>,
    pub dir: Option<PathBuf>,
}

pub(crate) async fn run(
    channels: Arc<Channels>,
    state: Arc<IdentityState>,
    credentials: Credentials,
    metrics: IdentityMetrics,
) {
    let mut rng = fastrand::Rng::new();
    // A certificate kept from an earlier run, still valid: in force at once, renewed with.
    let kept = credentials.dir.as_deref().and_then(|dir| match stored::load(dir) {
        Ok(kept) => kept,
        Err(why) => {
            warn!(dir = %dir.display(), %why, "the kept identity is unusable; a join token is needed");
            None
        }
    });
    let (key, mut credential, mut first_wait) = match (kept, &credentials.join_token) {
        (Some((key, svid)), _) => {
            info!(id = %svid.spiffe_id, not_after = %humantime::format_rfc3339_seconds(svid.not_after), "certificate kept from an earlier run in force");
            metrics.set_expiry(svid.not_after);
            let credential = pb::certify_request::Credential::Certificate(svid.chain[0].clone());
            let renew_at = renew_at(&svid, &mut rng);
            state.set(svid);
            (key, credential, Some(renew_at))
        }
        (None, Some(token)) => match KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256) {
            Ok(key) => (
                key,
                pb::certify_request::Credential::JoinToken(token.clone()),
                None,
            ),
            Err(e) => {
                error!(error = %e, "cannot generate this sidecar's key: it has no identity");
                state.set_error(Some(format!("generating the key: {e}")));
                return;
            }
        },
        (None, None) => {
            let why = "no join token, and no valid certificate kept in control.identity_dir: create one with `malla token create --service SERVICE` and give it with MALLA_JOIN_TOKEN";
            error!("{why}");
            state.set_error(Some(why.to_string()));
            return;
        }
    };
    let csr = match CertificateParams::default().serialize_request(&key) {
        Ok(csr) => csr.der().to_vec(),
        Err(e) => {
            error!(error = %e, "cannot make this sidecar's CSR: it has no identity");
            state.set_error(Some(format!("making the CSR: {e}")));
            return;
        }
    };
    let key_pkcs8 = Arc::new(key.serialize_der());
    let mut backoff = Backoff::new(RETRY_BASE, RETRY_MAX);
    loop {
        if let Some(at) = first_wait.take() {
            sleep_until(at).await;
        }
        let renewal = matches!(credential, pb::certify_request::Credential::Certificate(_));
        let client = IdentityClient::new(match renewal {
            true => channels.writes(),
            false => channels.reads(),
        });
        match certify(&client, &state, &csr, credential.clone()).await {
            Ok(answer) => {
                backoff.reset();
                let svid = match svid(answer, &key_pkcs8) {
                    Ok(svid) => svid,
                    Err(why) => {
                        metrics.request(renewal, "invalid-answer");
                        warn!(%why, "the control plane's certificate answer is unusable; retrying");
                        state.set_error(Some(why));
                        tokio::time::sleep(backoff.next_delay()).await;
                        continue;
                    }
                };
                if let Some(dir) = &credentials.dir {
                    if let Err(why) = stored::save(dir, &key, &svid) {
                        warn!(dir = %dir.display(), %why, "cannot keep the identity for the next start");
                    }
                }
                info!(id = %svid.spiffe_id, not_after = %humantime::format_rfc3339_seconds(svid.not_after), renewal, "certificate in force");
                if let Some(previous) = state.current() {
                    if previous.trust_bundle != svid.trust_bundle {
                        // A root rotation: the CA added a new root, or dropped the old one.
                        info!(
                            roots = svid.trust_bundle.len(),
                            before = previous.trust_bundle.len(),
                            "the trust bundle changed; peers are verified with it from the next connection"
                        );
                    }
                }
                credential = pb::certify_request::Credential::Certificate(svid.chain[0].clone());
                let renew_at = renew_at(&svid, &mut rng);
                metrics.set_expiry(svid.not_after);
                state.set(svid);
                // Counted once in force: whoever sees the count sees the certificate.
                metrics.request(renewal, "ok");
                sleep_until(renew_at).await;
            }
            Err(status) => {
                let refused = matches!(
                    status.code(),
                    Code::PermissionDenied | Code::InvalidArgument | Code::Unauthenticated
                );
                metrics.request(renewal, if refused { "refused" } else { "unavailable" });
                let message = format!(
                    "{}: {}",
                    if renewal {
                        "renewing the certificate"
                    } else {
                        "getting the first certificate"
                    },
                    status.message()
                );
                if refused {
                    error!(code = ?status.code(), "{message}");
                } else {
                    warn!(code = ?status.code(), "{message}; retrying");
                }
                if state
                    .current()
                    .is_some_and(|s| s.is_expired(SystemTime::now()))
                {
                    error!("this sidecar's certificate has expired: peers will refuse it until a renewal succeeds");
                }
                state.set_error(Some(message));
                // A refusal will not change by itself (a spent token, a certificate of
                // another CA): ask again seldom, and log it seldom.
                let wait = backoff.next_delay();
                tokio::time::sleep(if refused {
                    wait.max(REFUSED_RETRY)
                } else {
                    wait
                })
                .await;
            }
        }
    }
}

/// When to renew `svid`, received now: somewhere between [`RENEW_FROM`] and [`RENEW_TO`] of
/// its remaining life.
fn renew_at(svid: &Svid, rng: &mut fastrand::Rng) -> SystemTime {
    let fraction = RENEW_FROM + rng.f64() * (RENEW_TO - RENEW_FROM);
    svid.renew_at(SystemTime::now(), fraction)
}

async fn certify(
    client: &IdentityClient<Channel>,
    state: &IdentityState,
    csr: &[u8],
    credential: pb::certify_request::Credential,
) -> Result<pb::CertifyResponse, tonic::Status> {
    let mut request = tonic::Request::new(pb::CertifyRequest {
        service: state.service.to_string(),
        csr: csr.to_vec(),
        credential: Some(credential),
    });
    request.set_timeout(RPC_TIMEOUT);
    client
        .clone()
        .certify(request)
        .await
        .map(tonic::Response::into_inner)
}

/// The answer as an [`Svid`], checked for what this sidecar relies on.
fn svid(answer: pb::CertifyResponse, key_pkcs8: &Arc<Vec<u8>>) -> Result<Svid, String> {
    let spiffe_id = SpiffeId::parse(&answer.spiffe_id).map_err(|e| e.to_string())?;
    if answer.certificate_chain.is_empty() {
        return Err("no certificate in the answer".into());
    }
    if answer.trust_bundle.is_empty() {
        return Err("no trust bundle in the answer".into());
    }
    Ok(Svid {
        spiffe_id,
        chain: answer.certificate_chain,
        key_pkcs8: key_pkcs8.clone(),
        trust_bundle: answer.trust_bundle,
        not_before: from_unix_ms(answer.not_before_unix_ms),
        not_after: from_unix_ms(answer.not_after_unix_ms),
    })
}

async fn sleep_until(at: SystemTime) {
    let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::time::sleep(wait).await;
}

//! This sidecar's workload identity: the X.509 SVID of its service
//! (`spiffe://DOMAIN/svc/SERVICE`), its private key and the mesh's trust bundle.
//!
//! The key is generated here, at start, and never leaves the process; the control plane's
//! CA certifies it (a join token proves the service the first time, the current certificate
//! every renewal after) and the certificate is renewed at about 70 % of its life
//! ([`crate::discovery`] runs that). Readers take the current [`Svid`] without a lock: a
//! renewal swaps in a new one, and what already holds the old one keeps it.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwapOption;
use malla_core::{ServiceName, SpiffeId};
use serde_json::json;

/// A certificate with its key and the roots to trust peers by.
pub struct Svid {
    pub spiffe_id: SpiffeId,
    /// DER: the leaf first, then any intermediates.
    pub chain: Vec<Vec<u8>>,
    /// The private key, PKCS#8 DER (never printed).
    pub key_pkcs8: Arc<Vec<u8>>,
    /// DER roots.
    pub trust_bundle: Vec<Vec<u8>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("spiffe_id", &self.spiffe_id.to_string())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Svid {
    /// When to renew: `fraction` (about 0.7) of the way from `received` (not from
    /// `not_before`, which the CA backdates for clock skew) to expiry.
    pub fn renew_at(&self, received: SystemTime, fraction: f64) -> SystemTime {
        let left = self.not_after.duration_since(received).unwrap_or_default();
        received + left.mul_f64(fraction.clamp(0.0, 1.0))
    }

    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }
}

/// The identity this sidecar holds (none until the CA first answers).
pub struct IdentityState {
    pub service: ServiceName,
    current: ArcSwapOption<Svid>,
    last_error: std::sync::Mutex<Option<String>>,
    /// Set once a first certificate is in force.
    issued: tokio::sync::watch::Sender<bool>,
}

impl IdentityState {
    pub fn new(service: ServiceName) -> Self {
        IdentityState {
            service,
            current: ArcSwapOption::empty(),
            last_error: std::sync::Mutex::new(None),
            issued: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Returns once a certificate is in force (at once if one is).
    pub async fn issued(&self) {
        let _ = self.issued.subscribe().wait_for(|issued| *issued).await;
    }

    pub fn current(&self) -> Option<Arc<Svid>> {
        self.current.load_full()
    }

    pub(crate) fn set(&self, svid: Svid) {
        self.current.store(Some(Arc::new(svid)));
        self.set_error(None);
        self.issued.send_replace(true);
    }

    pub(crate) fn set_error(&self, error: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = error;
    }

    /// The `identity` part of `/config` (never the key).
    pub fn to_json(&self) -> serde_json::Value {
        let svid = self.current();
        let unix = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
        json!({
            "service": self.service,
            "spiffe_id": svid.as_ref().map(|s| s.spiffe_id.to_string()),
            "not_before": svid.as_ref().map(|s| unix(s.not_before)),
            "not_after": svid.as_ref().map(|s| unix(s.not_after)),
            "expires_in_seconds": svid.as_ref().map(|s| s.not_after.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO).as_secs()),
            "trust_bundle_roots": svid.as_ref().map_or(0, |s| s.trust_bundle.len()),
            "last_error": self.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        })
    }
}

/// Unix milliseconds (as the API sends them) to a time.
pub(crate) fn from_unix_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

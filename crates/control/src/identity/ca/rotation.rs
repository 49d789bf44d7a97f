//! Rotating the root the CA made: a new root replaces the old one without a failed
//! handshake anywhere in the mesh.
//!
//! # Why two phases
//!
//! A sidecar hears the trust bundle only when it gets a certificate (at start and at each
//! renewal, about every 70 % of the certificate TTL). If the CA began signing with a new
//! root the moment it made one, the first sidecar renewed would present a certificate of
//! the new root to peers that have not renewed yet and trust only the old one: their
//! handshakes would fail for up to one TTL. So the rotation is ordered, as SPIRE orders
//! its "prepared", "active" and "old" authorities:
//!
//! ```text
//!            started_at            switch_at               ends_at
//! bundle     old | old + new ------ new + old ------------ | new
//! signs      old | old ------------ | new ---------------------
//!                  announcing          retiring
//! ```
//!
//! - **announcing** (`started_at..switch_at`): the new root is in every bundle the CA
//!   hands out, the old root still signs. A certificate valid at `switch_at` was issued
//!   after `started_at` (each phase lasts at least one TTL, and no certificate outlives its
//!   TTL), so its holder's bundle holds the new root: every sidecar still in the mesh
//!   trusts the new root before anyone presents a certificate of it.
//! - **retiring** (`switch_at..ends_at`): the new root signs; the old one stays in the
//!   bundle, and its certificates are still renewed, until every certificate it signed
//!   has been renewed or has expired — again one TTL, since the last was issued just
//!   before `switch_at`.
//! - At `ends_at` the old root leaves the bundle. A sidecar whose bundle still holds it
//!   trusts one root too many until its next renewal, never one too few.
//!
//! The other way to order it — sidecars fetching the bundle more often than they renew —
//! would need a new stream to every sidecar and still leave a window as long as the
//! fetch interval; this way needs nothing new from sidecars (any version, and tools that
//! renew over HTTP, follow it) and holds even when the control plane is down for part of
//! a phase: the argument above rests on certificate lifetimes alone. Its cost is time: a
//! rotation takes twice the overlap, two days and a few hours with 24 h certificates.
//!
//! Phases are decided by the wall clock against the plan kept in `rotation.json`, so a
//! restart anywhere in a rotation resumes it where the clock says it is.

use std::time::{Duration, SystemTime};

use serde_json::json;

use super::files::time_json;

/// The overlap is at least this much longer than the certificate TTL by default (or a
/// tenth of the TTL, when that is more): room for clocks a little apart and renewals a
/// little late.
const MIN_MARGIN: Duration = Duration::from_secs(60);
/// The longest overlap taken.
pub const MAX_OVERLAP: Duration = Duration::from_secs(365 * 24 * 3600);

/// Where a rotation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Both roots in the bundle; the old one signs.
    Announcing,
    /// Both roots in the bundle; the new one signs.
    Retiring,
    /// The new root alone.
    Over,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Announcing => "announcing",
            Phase::Retiring => "retiring",
            Phase::Over => "over",
        }
    }
}

/// When a rotation changes phase, as kept in `rotation.json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub started_at: SystemTime,
    pub switch_at: SystemTime,
    pub ends_at: SystemTime,
    /// The new root's SHA-256 fingerprint: `next.crt` is checked against it.
    pub next_sha256: String,
}

impl Plan {
    /// A rotation starting at `now` whose phases last `overlap` each.
    pub fn new(now: SystemTime, overlap: Duration, next_sha256: String) -> Plan {
        Plan {
            started_at: now,
            switch_at: now + overlap,
            ends_at: now + overlap + overlap,
            next_sha256,
        }
    }

    pub fn phase(&self, now: SystemTime) -> Phase {
        if now < self.switch_at {
            Phase::Announcing
        } else if now < self.ends_at {
            Phase::Retiring
        } else {
            Phase::Over
        }
    }

    pub fn is_over(&self, now: SystemTime) -> bool {
        self.phase(now) == Phase::Over
    }

    pub fn overlap(&self) -> Duration {
        self.switch_at
            .duration_since(self.started_at)
            .unwrap_or_default()
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "started_at": time_json(self.started_at),
            "switch_at": time_json(self.switch_at),
            "ends_at": time_json(self.ends_at),
            "next_sha256": self.next_sha256,
        })
    }

    pub fn from_json(value: &serde_json::Value) -> Result<Plan, String> {
        let time = |field: &str| {
            let text = value[field].as_str().ok_or_else(|| format!("no {field}"))?;
            humantime::parse_rfc3339(text).map_err(|e| format!("{field} {text:?}: {e}"))
        };
        let plan = Plan {
            started_at: time("started_at")?,
            switch_at: time("switch_at")?,
            ends_at: time("ends_at")?,
            next_sha256: value["next_sha256"]
                .as_str()
                .ok_or("no next_sha256")?
                .to_string(),
        };
        if !(plan.started_at <= plan.switch_at && plan.switch_at <= plan.ends_at) {
            return Err("its times are out of order".into());
        }
        Ok(plan)
    }
}

/// The overlap when the operator gives none: one certificate TTL and a margin.
pub fn default_overlap(cert_ttl: Duration) -> Duration {
    cert_ttl + (cert_ttl / 10).max(MIN_MARGIN)
}

/// Why a rotation was not started.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error(
        "this CA is the operator's (--ca-cert, --ca-key): malla does not rotate it. To \
         replace its intermediate under the same root, sign a new one for the same key and \
         restart with it; a new root or key means new files and new join tokens for every \
         workload (see docs/identity.md, Rotating the root)"
    )]
    OperatorCa,
    #[error(
        "a root rotation is already under way ({phase}; the old root leaves the trust bundle \
         at {ends_at}): wait for it to end (malla identity shows it)"
    )]
    InProgress {
        phase: &'static str,
        ends_at: String,
    },
    #[error(
        "overlap {overlap} is shorter than the certificate TTL ({ttl}): each phase must last \
         at least one TTL so that every sidecar renews in it; give at least {ttl}, or omit it \
         for the default ({default})"
    )]
    TooShort {
        overlap: String,
        ttl: String,
        default: String,
    },
    #[error("overlap {0} is longer than a year")]
    TooLong(String),
    #[error(transparent)]
    Ca(#[from] super::CaError),
}

#[cfg(test)]
mod tests;

//! Join tokens: how a sidecar proves, once, which service it belongs to.
//!
//! An operator creates one for a service (`malla token create --service NAME`) and hands it
//! to the sidecar; the sidecar sends it with its first CSR and gets that service's identity.
//! A token is used once: later certificates are renewals, proved with the current one.
//!
//! Only a SHA-256 of each token is stored (`/malla/identity/join-tokens/{sha256 hex}`), so
//! the store (or a backup of it) holds nothing that could be presented. The key carries a
//! lease of the token's TTL: an expired token leaves the store by itself. Redeeming marks it
//! used in a compare-and-set on its revision (not a delete), so that of two concurrent
//! redemptions one wins, and a second use is told "already used" rather than "unknown".

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use malla_core::ServiceName;
use serde::{Deserialize, Serialize};

use crate::store::{Precondition, Store, StoreError};

const PREFIX: &str = "/malla/identity/join-tokens/";
/// What every token starts with, so that secret scanners and people can tell one.
pub const TOKEN_PREFIX: &str = "malla_join_";
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
pub const MIN_TTL: Duration = Duration::from_secs(10);
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the join token is unknown or expired: create a new one with `malla token create --service SERVICE`")]
    Unknown,
    #[error("the join token was already used (at {0}): each token registers one sidecar once; create a new one with `malla token create --service SERVICE`")]
    Used(String),
    #[error("the join token is for service {token}, not {asked}: create one for {asked} with `malla token create --service {asked}`")]
    OtherService { token: String, asked: String },
    #[error("ttl must be from {}s to {}s (30 days)", MIN_TTL.as_secs(), MAX_TTL.as_secs())]
    Ttl,
    #[error("the join token was redeemed concurrently: only one use counts")]
    Race,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the store keeps about a token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    service: ServiceName,
    created_at: String,
    expires_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    used_at: Option<String>,
}

/// A token just created: the secret itself is shown this once.
#[derive(Clone, Debug, Serialize)]
pub struct Created {
    pub token: String,
    pub service: ServiceName,
    pub ttl_seconds: u64,
    /// RFC 3339 UTC.
    pub expires_at: String,
}

pub struct JoinTokens<S> {
    store: S,
}

impl<S: Store> JoinTokens<S> {
    pub fn new(store: S) -> Self {
        JoinTokens { store }
    }

    pub async fn create(
        &self,
        service: &ServiceName,
        ttl: Option<Duration>,
    ) -> Result<Created, TokenError> {
        let ttl = ttl.unwrap_or(DEFAULT_TTL);
        if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
            return Err(TokenError::Ttl);
        }
        let mut secret = [0u8; 32];
        aws_lc_rs::rand::fill(&mut secret)
            .map_err(|_| StoreError::Backend("no randomness from the OS".into()))?;
        let token = format!("{TOKEN_PREFIX}{}", hex(&secret));
        let now = SystemTime::now();
        let expires = now + ttl;
        let record = Record {
            service: service.clone(),
            created_at: rfc3339(now),
            expires_at_ms: unix_ms(expires),
            used_at: None,
        };
        let lease = self.store.grant_lease(ttl).await?;
        let value = serde_json::to_vec(&record).map_err(|e| StoreError::Invalid(e.to_string()))?;
        self.store
            .put(&key(&token), value, Some(lease.id), Precondition::Absent)
            .await?;
        crate::metrics::process().join_token_created();
        Ok(Created {
            token,
            service: service.clone(),
            ttl_seconds: ttl.as_secs(),
            expires_at: rfc3339(expires),
        })
    }

    /// Uses `token` for `service`: it must exist, be unexpired, unused and for that service.
    pub async fn redeem(&self, token: &str, service: &ServiceName) -> Result<(), TokenError> {
        let key = key(token.trim());
        let Some(kv) = self.store.get(&key).await? else {
            return Err(TokenError::Unknown);
        };
        let mut record: Record =
            serde_json::from_slice(&kv.value).map_err(|_| TokenError::Unknown)?;
        if unix_ms(SystemTime::now()) >= record.expires_at_ms {
            // The lease removes it within a moment.
            return Err(TokenError::Unknown);
        }
        if let Some(at) = record.used_at {
            return Err(TokenError::Used(at));
        }
        if &record.service != service {
            return Err(TokenError::OtherService {
                token: record.service.to_string(),
                asked: service.to_string(),
            });
        }
        record.used_at = Some(rfc3339(SystemTime::now()));
        let value = serde_json::to_vec(&record).map_err(|e| StoreError::Invalid(e.to_string()))?;
        match self
            .store
            .put(
                &key,
                value,
                kv.lease,
                Precondition::ModRevision(kv.mod_revision),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(StoreError::Conflict { .. }) => Err(TokenError::Race),
            Err(StoreError::LeaseNotFound(_)) => Err(TokenError::Unknown),
            Err(e) => Err(e.into()),
        }
    }
}

fn key(token: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    format!("{PREFIX}{}", hex(digest.as_ref()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{api::grpc::tests::TempDir, store::embedded::EmbeddedStore};

    fn svc(name: &str) -> ServiceName {
        ServiceName::new(name).unwrap()
    }

    #[tokio::test]
    async fn a_token_is_used_once_for_its_service() {
        let dir = TempDir::new("join-tokens");
        let store = EmbeddedStore::open(&dir.0).await.unwrap();
        let tokens = JoinTokens::new(store.clone());
        let created = tokens.create(&svc("checkout"), None).await.unwrap();
        assert!(created.token.starts_with(TOKEN_PREFIX));
        assert_eq!(created.token.len(), TOKEN_PREFIX.len() + 64);
        assert_eq!(created.ttl_seconds, 3600);

        let e = tokens
            .redeem(&created.token, &svc("payments"))
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("is for service checkout, not payments"),
            "{e}"
        );
        tokens
            .redeem(&created.token, &svc("checkout"))
            .await
            .unwrap();
        let e = tokens
            .redeem(&created.token, &svc("checkout"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("already used (at "), "{e}");
        let e = tokens
            .redeem("malla_join_00", &svc("checkout"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("unknown or expired"), "{e}");

        // Only the digest is stored.
        let (kvs, _) = store.range(PREFIX).await.unwrap();
        assert_eq!(kvs.len(), 1);
        let stored = String::from_utf8_lossy(&kvs[0].value).to_string() + &kvs[0].key;
        assert!(!stored.contains(&created.token[TOKEN_PREFIX.len()..]));
        assert!(matches!(
            tokens.create(&svc("a"), Some(Duration::from_secs(1))).await,
            Err(TokenError::Ttl)
        ));
        store.close().await.unwrap();
    }
}

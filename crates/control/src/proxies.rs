//! The sidecars connected to this control plane (`GET /v1/proxies`, `malla get proxies`).
//!
//! Every connection that makes a gRPC call is listed, from its first call until it closes:
//! its address, the version its user agent gives (`malla-proxy/<version>`), the instance
//! it registered (if any), when it connected, when it last called (any RPC, a heartbeat
//! included), and the watch streams it holds. The entry is the connection's own
//! ([`Connection`], created by [`crate::serving`] and handed to the gRPC handlers as a
//! request extension), so no lookup is needed on the way, and the list holds only
//! connections open now: a connection's entry goes with it.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::SystemTime,
};

use malla_core::{ServiceName, SpiffeId};
use serde::Serialize;

/// The connections that made gRPC calls, by connection number.
#[derive(Default)]
pub struct Proxies {
    next: AtomicU64,
    listed: Mutex<BTreeMap<u64, Arc<Connection>>>,
}

/// One client connection, whatever it has done so far.
pub struct Connection {
    id: u64,
    address: SocketAddr,
    /// What the client proved with its certificate (none: it presented none).
    identity: Option<Arc<SpiffeId>>,
    since: SystemTime,
    listed: AtomicBool,
    watches: AtomicU32,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    user_agent: Option<String>,
    last_seen: Option<SystemTime>,
    registered: Option<(ServiceName, String)>,
}

/// One line of `GET /v1/proxies`.
#[derive(Debug, Serialize)]
pub struct ProxyInfo {
    pub address: String,
    /// The SPIFFE ID its certificate proved; `null` when it presented none.
    pub identity: Option<String>,
    pub service: Option<String>,
    pub instance: Option<String>,
    /// From a `malla-proxy/<version>` user agent; `null` for other clients.
    pub version: Option<String>,
    pub user_agent: Option<String>,
    pub connected_since: String,
    pub last_seen: String,
    /// Watch streams held (registry and policy).
    pub watches: u32,
}

impl Proxies {
    /// A new connection, not listed until its first gRPC call; [`Proxies::closed`] forgets
    /// it.
    pub fn opened(&self, address: SocketAddr, identity: Option<Arc<SpiffeId>>) -> Arc<Connection> {
        Arc::new(Connection {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            address,
            identity,
            since: SystemTime::now(),
            listed: AtomicBool::new(false),
            watches: AtomicU32::new(0),
            state: Mutex::new(State::default()),
        })
    }

    /// A gRPC call arrived on `connection` with this user agent.
    pub fn called(&self, connection: &Arc<Connection>, user_agent: Option<&str>) {
        {
            let mut state = connection.state();
            state.last_seen = Some(SystemTime::now());
            if state.user_agent.as_deref() != user_agent {
                state.user_agent = user_agent.map(truncated);
            }
        }
        if !connection.listed.swap(true, Ordering::Relaxed) {
            lock(&self.listed).insert(connection.id, connection.clone());
        }
    }

    pub fn closed(&self, connection: &Connection) {
        if connection.listed.load(Ordering::Relaxed) {
            lock(&self.listed).remove(&connection.id);
        }
    }

    /// Every listed connection, by address.
    pub fn list(&self) -> Vec<ProxyInfo> {
        let connections: Vec<_> = lock(&self.listed).values().cloned().collect();
        let mut list: Vec<_> = connections.iter().map(|c| c.info()).collect();
        list.sort_by(|a, b| a.address.cmp(&b.address));
        list
    }
}

impl Connection {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// The instance this connection registered (the last one, if several).
    pub fn registered(&self, service: &ServiceName, id: &str) {
        self.state().registered = Some((service.clone(), id.to_string()));
    }

    /// The instance was deregistered: forgotten if it is the one this connection holds.
    pub fn deregistered(&self, service: &ServiceName, id: &str) {
        let mut state = self.state();
        if state
            .registered
            .as_ref()
            .is_some_and(|(s, i)| s == service && i == id)
        {
            state.registered = None;
        }
    }

    /// Counts a watch stream held until the guard drops.
    pub fn watch_opened(self: &Arc<Self>) -> WatchHeld {
        self.watches.fetch_add(1, Ordering::Relaxed);
        WatchHeld(self.clone())
    }

    fn info(&self) -> ProxyInfo {
        let state = self.state();
        let (service, instance) = match &state.registered {
            Some((s, i)) => (Some(s.to_string()), Some(i.clone())),
            None => (None, None),
        };
        ProxyInfo {
            address: self.address.to_string(),
            identity: self.identity.as_ref().map(|id| id.to_string()),
            service,
            instance,
            version: state.user_agent.as_deref().and_then(proxy_version),
            user_agent: state.user_agent.clone(),
            connected_since: rfc3339(self.since),
            last_seen: rfc3339(state.last_seen.unwrap_or(self.since)),
            watches: self.watches.load(Ordering::Relaxed),
        }
    }
}

/// A watch stream held by a connection.
pub struct WatchHeld(Arc<Connection>);

impl Drop for WatchHeld {
    fn drop(&mut self) {
        self.0.watches.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The version in a `malla-proxy/<version>` product token (tonic appends its own after it).
fn proxy_version(user_agent: &str) -> Option<String> {
    user_agent
        .split_whitespace()
        .find_map(|token| token.strip_prefix("malla-proxy/"))
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

/// A user agent is the client's to choose: at most 128 bytes of it are kept.
fn truncated(user_agent: &str) -> String {
    let mut end = user_agent.len().min(128);
    while !user_agent.is_char_boundary(end) {
        end -= 1;
    }
    user_agent[..end].to_string()
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A poisoned lock still holds consistent data here (every update is one assignment).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_listed_from_its_first_grpc_call_until_it_closes() {
        let proxies = Proxies::default();
        let conn = proxies.opened("127.0.0.1:40000".parse().unwrap(), None);
        assert!(proxies.list().is_empty());
        proxies.called(&conn, Some("malla-proxy/1.2.3 tonic/0.14.9"));
        let orders = ServiceName::new("orders").unwrap();
        conn.registered(&orders, "o-1");
        let watch = conn.watch_opened();
        let list = proxies.list();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].address, "127.0.0.1:40000");
        assert_eq!(list[0].version.as_deref(), Some("1.2.3"));
        assert_eq!(list[0].service.as_deref(), Some("orders"));
        assert_eq!(list[0].instance.as_deref(), Some("o-1"));
        assert_eq!(list[0].watches, 1);
        assert!(list[0].connected_since.ends_with('Z'));
        drop(watch);
        conn.deregistered(&orders, "o-2");
        assert_eq!(proxies.list()[0].instance.as_deref(), Some("o-1"));
        conn.deregistered(&orders, "o-1");
        let list = proxies.list();
        assert_eq!((list[0].watches, list[0].instance.as_deref()), (0, None));
        proxies.closed(&conn);
        assert!(proxies.list().is_empty());
    }

    #[test]
    fn versions_come_only_from_a_malla_proxy_token() {
        assert_eq!(proxy_version("grpc-go/1.60"), None);
        assert_eq!(proxy_version("malla-proxy/ tonic/0.14"), None);
        assert_eq!(
            proxy_version("tonic/0.14 malla-proxy/0.1.0").as_deref(),
            Some("0.1.0")
        );
        assert_eq!(truncated(&"é".repeat(100)).len(), 128);
    }
}

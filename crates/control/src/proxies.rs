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
    /// The connections this entry stands for (a sidecar holds one for reads and one for
    /// writes).
    pub connections: u32,
}

impl ProxyInfo {
    /// Adds another connection of the same sidecar: what either knows, the earliest
    /// connection, the latest call, every watch.
    fn merge(&mut self, other: ProxyInfo) {
        self.identity = self.identity.take().or(other.identity);
        if self.instance.is_none() {
            self.service = other.service;
            self.instance = other.instance;
        }
        // RFC 3339 UTC to the second: the text orders as the time does.
        self.connected_since = self.connected_since.clone().min(other.connected_since);
        self.last_seen = self.last_seen.clone().max(other.last_seen);
        self.watches += other.watches;
        self.connections += other.connections;
    }
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

    /// Every listed client, by address: the connections of one sidecar (its user agent's
    /// `(sidecar ID)`: one for reads, one for writes with its certificate) as one entry.
    pub fn list(&self) -> Vec<ProxyInfo> {
        let connections: Vec<_> = lock(&self.listed).values().cloned().collect();
        let mut infos: Vec<_> = connections.iter().map(|c| c.info()).collect();
        infos.sort_by(|a, b| a.address.cmp(&b.address));
        let mut list: Vec<ProxyInfo> = Vec::with_capacity(infos.len());
        let mut by_sidecar: BTreeMap<String, usize> = BTreeMap::new();
        for info in infos {
            let sidecar = info.user_agent.as_deref().and_then(sidecar_id);
            match sidecar.and_then(|id| by_sidecar.get(id)) {
                Some(&i) => list[i].merge(info),
                None => {
                    if let Some(id) = sidecar {
                        by_sidecar.insert(id.to_string(), list.len());
                    }
                    list.push(info);
                }
            }
        }
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
            connections: 1,
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

/// The ID in a user agent's `(sidecar ID)` comment, which `malla proxy` sends.
fn sidecar_id(user_agent: &str) -> Option<&str> {
    let rest = &user_agent[user_agent.find("(sidecar ")? + "(sidecar ".len()..];
    let id = &rest[..rest.find(')')?];
    (!id.is_empty()).then_some(id)
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
    fn the_connections_of_one_sidecar_are_one_entry() {
        let proxies = Proxies::default();
        let ua = "malla-proxy/1.2.3 (sidecar 00ff) tonic/0.14.9";
        let reads = proxies.opened("127.0.0.1:40000".parse().unwrap(), None);
        let id = SpiffeId::parse("spiffe://malla.local/svc/orders").unwrap();
        let writes = proxies.opened("127.0.0.1:40001".parse().unwrap(), Some(Arc::new(id)));
        let other = proxies.opened("127.0.0.1:40002".parse().unwrap(), None);
        proxies.called(&reads, Some(ua));
        let _watch = reads.watch_opened();
        proxies.called(&writes, Some(ua));
        writes.registered(&ServiceName::new("orders").unwrap(), "o-1");
        proxies.called(
            &other,
            Some("malla-proxy/1.2.3 (sidecar 0a0a) tonic/0.14.9"),
        );
        let list = proxies.list();
        assert_eq!(list.len(), 2, "{list:?}");
        let one = &list[0];
        assert_eq!(one.address, "127.0.0.1:40000");
        assert_eq!(one.connections, 2);
        assert_eq!(one.watches, 1);
        assert_eq!(one.instance.as_deref(), Some("o-1"));
        assert_eq!(
            one.identity.as_deref(),
            Some("spiffe://malla.local/svc/orders")
        );
        assert_eq!(list[1].connections, 1);
        assert_eq!(sidecar_id("malla-proxy/1 (sidecar )"), None);
        assert_eq!(sidecar_id("curl/8"), None);
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

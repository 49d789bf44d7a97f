//! Reading the proxy's admin listener: `/live`, `/ready`, `/metrics`, `/config`.

use std::net::SocketAddr;

use http::Version;

use crate::{
    client::{self, within, Http1},
    BoxError,
};

/// `GET path` on the admin listener: status and body.
pub async fn get(admin: SocketAddr, path: &str) -> Result<(u16, String), BoxError> {
    let mut conn = Http1::connect(admin).await?;
    let response = within(
        "admin request",
        conn.send(client::get(Version::HTTP_11, "admin", path)),
    )
    .await?;
    let collected = client::collect(response).await?;
    Ok((collected.status, collected.text()))
}

/// The status of `path`, or 0 when the admin listener cannot be reached.
pub async fn status(admin: SocketAddr, path: &str) -> u16 {
    get(admin, path).await.map_or(0, |(status, _)| status)
}

/// The Prometheus text of `/metrics`.
pub async fn metrics(admin: SocketAddr) -> String {
    let (status, text) = get(admin, "/metrics")
        .await
        .unwrap_or_else(|e| panic!("GET /metrics failed: {e}"));
    assert_eq!(status, 200, "GET /metrics: {text}");
    text
}

/// The JSON of `/config`.
pub async fn config(admin: SocketAddr) -> serde_json::Value {
    let (status, text) = get(admin, "/config")
        .await
        .unwrap_or_else(|e| panic!("GET /config failed: {e}"));
    assert_eq!(status, 200, "GET /config: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("/config is not JSON ({e}): {text}"))
}

/// The sum of the samples of `name` whose labels include all of `labels`; `None` when no
/// sample matches. Understands the text exposition format the proxy writes
/// (`name{k="v",...} value`; label values without escaped quotes or commas).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut total = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if series_name != name {
            continue;
        }
        let pairs: Vec<(&str, &str)> = series_labels
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim().trim_matches('"')))
            .collect();
        if labels.iter().all(|l| pairs.contains(l)) {
            if let Ok(v) = value.trim().parse::<f64>() {
                *total.get_or_insert(0.0) += v;
            }
        }
    }
    total
}

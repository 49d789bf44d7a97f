//! The event routes over a real socket, against a real control plane.

use http::Method;
use serde_json::Value;

use crate::{
    api::{
        grpc::tests::{control, TempDir},
        http::resources::tests::call,
    },
    events::{ReportedEvent, Reporter},
};

fn event(service: &str, kind: &str, at_ms: u64) -> ReportedEvent {
    ReportedEvent {
        seq: 0,
        at_ms,
        received_at_ms: at_ms,
        reporter: Reporter {
            service: Some("frontend".into()),
            instance_id: Some("frontend-1".into()),
        },
        service: Some(service.into()),
        upstream: service.into(),
        endpoint: Some("127.0.0.1:9".parse().unwrap()),
        kind: kind.into(),
        audit: false,
        count: 1,
        detail: "5 consecutive failures".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_newest_last_filtered() {
    let dir = TempDir::new("http-events");
    let control = control(&dir).await;
    control.events.push(vec![
        event("quote", "ejected", 1),
        event("billing", "ejected", 2),
        event("quote", "closed", 3),
    ]);
    let at = |v: &Value| -> Vec<u64> {
        v["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["at_ms"].as_u64().unwrap())
            .collect()
    };
    let (status, all) = call(&control, Method::GET, "/v1/events", "").await;
    assert_eq!(status, 200);
    assert_eq!(at(&all), [1, 2, 3]);
    assert_eq!(all["kept"], 3);
    assert_eq!(all["capacity"], 10_000);
    assert_eq!(all["events"][0]["endpoint"], "127.0.0.1:9");
    assert_eq!(all["events"][0]["reporter"]["instance_id"], "frontend-1");
    let (_, quote) = call(&control, Method::GET, "/v1/events?service=quote", "").await;
    assert_eq!(at(&quote), [1, 3]);
    let (_, ejected) = call(&control, Method::GET, "/v1/events?kind=ejected&limit=1", "").await;
    assert_eq!(at(&ejected), [2]);
    for bad in [
        "limit=0",
        "limit=10001",
        "limit=x",
        "service=Bad_Name",
        "colour=red",
    ] {
        let (status, error) = call(&control, Method::GET, &format!("/v1/events?{bad}"), "").await;
        assert_eq!(status, 400, "{bad}: {error}");
        assert_eq!(error["error"]["code"], "invalid_argument", "{bad}");
    }
    control.stop().await;
}

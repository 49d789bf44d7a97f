//! The admin listener: `/live`, `/ready`, `/metrics`, `/config`.

use malla_tests::{
    assert_eventually,
    cross_version::Flavor,
    peers::HttpPeer,
    proxy::{admin, TestProxy},
};

fn setup(peer: &HttpPeer) -> TestProxy {
    TestProxy::builder()
        .upstream("echo", &[peer.addr()])
        .outbound("echo")
        .admin()
        .start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_and_ready() {
    let peer = HttpPeer::http1("echo");
    let proxy = setup(&peer);
    assert_eq!(admin::status(proxy.admin(), "/live").await, 200);
    assert_eq!(admin::status(proxy.admin(), "/ready").await, 200);
    assert_eq!(admin::status(proxy.admin(), "/nope").await, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_list_every_endpoint_series() {
    let peer = HttpPeer::http1("echo");
    let proxy = setup(&peer);
    let text = admin::metrics(proxy.admin()).await;
    let endpoint = peer.addr().to_string();
    for class in ["1xx", "2xx", "3xx", "4xx", "5xx"] {
        let labels = [
            ("upstream", "echo"),
            ("endpoint", endpoint.as_str()),
            ("status_class", class),
        ];
        assert_eq!(
            admin::metric(&text, "malla_proxy_responses_total", &labels),
            Some(0.0),
            "no {class} series for the endpoint in:\n{text}"
        );
    }
    assert_eq!(
        admin::metric(
            &text,
            "malla_proxy_upstream_endpoints",
            &[("upstream", "echo")]
        ),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_proxy_errors_by_cause() {
    let peer = HttpPeer::http1("echo");
    let proxy = setup(&peer);
    proxy.set_endpoints("echo", &[]);
    let mut client = Flavor::Http1.client(proxy.outbound(), "echo");
    for _ in 0..2 {
        assert_eq!(
            client.call("none").await.cause.as_deref(),
            Some("no-endpoints")
        );
    }
    let text = admin::metrics(proxy.admin()).await;
    let labels = [("upstream", "echo"), ("cause", "no-endpoints")];
    assert_eq!(
        admin::metric(&text, "malla_proxy_errors_total", &labels),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        admin::metric(
            &text,
            "malla_proxy_upstream_endpoints",
            &[("upstream", "echo")]
        ),
        Some(0.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_responses_by_status_class() {
    let peer = HttpPeer::http1("echo");
    let proxy = setup(&peer);
    let endpoint = peer.addr().to_string();
    let mut client = Flavor::Http1.client(proxy.outbound(), "echo");
    for _ in 0..3 {
        client.call("ok").await.assert_ok();
    }
    peer.set_status(503);
    assert_eq!(client.call("fail").await.status, 503);
    let admin_addr = proxy.admin();
    let count = |class: &'static str| {
        let endpoint = endpoint.clone();
        async move {
            let text = admin::metrics(admin_addr).await;
            admin::metric(
                &text,
                "malla_proxy_responses_total",
                &[
                    ("upstream", "echo"),
                    ("endpoint", endpoint.as_str()),
                    ("status_class", class),
                ],
            )
        }
    };
    // Counted when the response completes, which may be just after the client has it.
    assert_eventually!(
        count("2xx").await == Some(3.0),
        "2xx: {:?}",
        count("2xx").await
    );
    assert_eventually!(
        count("5xx").await == Some(1.0),
        "5xx: {:?}",
        count("5xx").await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_lists_upstreams_and_live_endpoints() {
    let a = HttpPeer::http1("a");
    let b = HttpPeer::http1("b");
    let proxy = TestProxy::builder()
        .upstream("echo", &[a.addr()])
        .outbound("echo")
        .upstream("other", &[a.addr(), b.addr()])
        .admin()
        .start();
    let endpoints = |doc: &serde_json::Value, name: &str| -> Vec<String> {
        let upstream = doc["upstreams"]
            .as_array()
            .expect("/config has an `upstreams` array")
            .iter()
            .find(|u| u["name"] == name)
            .unwrap_or_else(|| panic!("upstream {name} missing from /config: {doc}"));
        upstream["endpoints"]
            .as_array()
            .expect("an upstream has an `endpoints` array")
            .iter()
            .map(|e| e["address"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let doc = admin::config(proxy.admin()).await;
    assert_eq!(doc["draining"], false);
    assert_eq!(endpoints(&doc, "echo"), [a.addr().to_string()]);
    assert_eq!(
        endpoints(&doc, "other"),
        [a.addr().to_string(), b.addr().to_string()]
    );

    proxy.set_endpoints("echo", &[b.addr()]);
    let doc = admin::config(proxy.admin()).await;
    assert_eq!(endpoints(&doc, "echo"), [b.addr().to_string()]);
}

/// Half-sent requests cannot pile up on the admin listener: each connection whose head is
/// not complete within `limits.head_timeout` is closed, and the admin answers meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_admin_requests_are_closed_at_the_head_timeout() {
    use std::time::Duration;

    use tokio::time::Instant;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
    };

    let peer = HttpPeer::http1("echo");
    let head_timeout = Duration::from_millis(300);
    let proxy = TestProxy::builder()
        .upstream("echo", &[peer.addr()])
        .outbound("echo")
        .admin()
        .limits(|l| l.head_timeout = head_timeout)
        .start();
    let started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..16 {
        let mut conn = TcpStream::connect(proxy.admin()).await.unwrap();
        conn.write_all(b"GET /metrics HTTP/1.1\r\nhost: admin\r\n")
            .await
            .unwrap();
        slow.push(conn);
    }
    assert_eq!(admin::status(proxy.admin(), "/live").await, 200);
    for mut conn in slow {
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => break,
                Ok(Ok(_)) => continue,
                Err(_) => panic!("a half-sent admin request was still open after 10 s"),
            }
        }
    }
    assert!(started.elapsed() >= head_timeout);
    assert_eq!(admin::status(proxy.admin(), "/live").await, 200);
}

//! Resilience over HTTP/2 and gRPC: breakers, retries around a failing endpoint, gRPC
//! statuses from heads and trailers, deadlines, replayed bodies, the retry budget, faults.

use super::*;

/// An upstream over `addrs`, balanced round robin (in this order) under `policy`.
fn round_robin(addrs: &[SocketAddr], policy: Option<Policy>) -> UpstreamConfig {
    let mut config = UpstreamConfig::new("svc", addrs.iter().map(|a| a.to_string()).collect());
    config.balancer = BalancerKind::RoundRobin;
    config.policy = policy;
    config
}

/// The breaker state of the endpoint at `addr` of `svc`.
fn breaker(proxy: &ProxyHandle, addr: SocketAddr) -> State {
    let upstream = proxy.upstream("svc").unwrap();
    let endpoints = upstream.endpoints();
    let endpoint = endpoints.iter().find(|e| e.addr == addr).unwrap();
    endpoint.breaker.state()
}

/// Counts the requests an upstream receives.
/// An upstream that counts every request in `hits`, then answers with `handler`.
async fn counting<F, Fut>(hits: &Arc<AtomicUsize>, handler: F) -> TestUpstream
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<TestBody>> + Send + 'static,
{
    let hits = hits.clone();
    upstream(move |req| {
        hits.fetch_add(1, Ordering::SeqCst);
        handler(req)
    })
    .await
}

fn counter() -> Arc<AtomicUsize> {
    Arc::new(AtomicUsize::new(0))
}

fn count(c: &AtomicUsize) -> usize {
    c.load(Ordering::SeqCst)
}

/// A unary gRPC reply: one message, then `grpc-status` in the trailers.
fn grpc_reply(message: Bytes, status: &'static str) -> Response<TestBody> {
    let (tx, body) = channel();
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", status.parse().unwrap());
    tx.try_send(Ok(Frame::data(message))).unwrap();
    tx.try_send(Ok(Frame::trailers(trailers))).unwrap();
    Response::builder()
        .header("content-type", "application/grpc")
        .body(body)
        .unwrap()
}

/// A trailers-only gRPC answer (the status in the head, no body).
fn grpc_trailers_only(status: &'static str) -> Response<TestBody> {
    Response::builder()
        .header("content-type", "application/grpc")
        .header("grpc-status", status)
        .body(empty())
        .unwrap()
}

fn grpc_call(message: &'static [u8]) -> Request<TestBody> {
    Request::post("http://svc.test/pkg.Svc/Call")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(
            Full::new(Bytes::from_static(message))
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap()
}

/// A POST whose body arrives in two DATA frames.
fn post_in_two_frames(path: &str) -> Request<TestBody> {
    let (tx, body) = channel();
    tx.try_send(data("part-1;")).unwrap();
    tx.try_send(data("part-2;")).unwrap();
    Request::post(format!("http://svc.test{path}"))
        .body(body)
        .unwrap()
}

#[tokio::test]
async fn a_failing_endpoint_is_retried_around_then_ejected() {
    let bad_hits = counter();
    let bad = counting(&bad_hits, move |_req| async {
        Response::builder()
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .body(full("bad"))
            .unwrap()
    })
    .await;
    let good = [
        upstream(|_req| async { Response::new(full("ok")) }).await,
        upstream(|_req| async { Response::new(full("ok")) }).await,
    ];
    let (proxy, addr) = proxy_with(round_robin(&[bad.addr, good[0].addr, good[1].addr], None));
    within(async {
        let mut c = client(addr).await;
        let mut sent = 0;
        while breaker(&proxy, bad.addr) != State::Ejected {
            assert!(sent < 60, "not ejected after {sent} requests");
            let resp = c.send_request(get("/")).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "request {sent}");
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "ok");
            sent += 1;
        }
        // Five consecutive failures (the default) ejected it; every one was retried.
        assert_eq!(count(&bad_hits), 5);
        for _ in 0..30 {
            let resp = c.send_request(get("/")).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
        }
        assert_eq!(count(&bad_hits), 5, "an ejected endpoint gets no traffic");
    })
    .await;
    let state = proxy.upstream("svc").unwrap().state();
    assert_eq!(state["endpoints"][0]["breaker"], "ejected", "{state}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn trailers_only_unavailable_is_retried_on_another_endpoint() {
    let (bad_hits, good_hits) = (counter(), counter());
    // Answers at once, without reading the request: the retry must still send it whole.
    let unavailable = counting(&bad_hits, move |_req| async { grpc_trailers_only("14") }).await;
    let echo = counting(&good_hits, move |req: Request<Incoming>| async move {
        let message = req.into_body().collect().await.unwrap().to_bytes();
        grpc_reply(message, "0")
    })
    .await;
    let (proxy, addr) = proxy_with(round_robin(&[unavailable.addr, echo.addr], None));
    within(async {
        let mut c = client(addr).await;
        for _ in 0..4 {
            let resp = c
                .send_request(grpc_call(b"\0\0\0\0\x05hello"))
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(header(resp.headers(), "grpc-status"), "");
            let collected = resp.into_body().collect().await.unwrap();
            let trailers = collected.trailers().cloned().unwrap();
            assert_eq!(header(&trailers, "grpc-status"), "0");
            assert_eq!(collected.to_bytes(), &b"\0\0\0\0\x05hello"[..]);
        }
    })
    .await;
    // Round robin starts with the failing endpoint, and every call meets it first.
    assert_eq!(count(&bad_hits), 4);
    assert_eq!(count(&good_hits), 4);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_grpc_status_in_trailers_is_relayed_and_counted_against_the_endpoint() {
    let hits = counter();
    let failing = counting(&hits, move |_req| async {
        grpc_reply(Bytes::from_static(b"\0\0\0\0\0"), "14")
    })
    .await;
    let fine = upstream(|_req| async { grpc_reply(Bytes::from_static(b"\0\0\0\0\0"), "0") }).await;
    let (proxy, addr) = proxy_with(round_robin(&[failing.addr, fine.addr], None));
    within(async {
        let mut c = client(addr).await;
        let mut unavailable = 0;
        let mut calls = 0;
        while breaker(&proxy, failing.addr) != State::Ejected {
            assert!(calls < 20, "not ejected after {calls} calls");
            let resp = c.send_request(grpc_call(b"\0\0\0\0\0")).await.unwrap();
            let collected = resp.into_body().collect().await.unwrap();
            let trailers = collected.trailers().cloned().unwrap();
            if header(&trailers, "grpc-status") == "14" {
                unavailable += 1;
            }
            calls += 1;
        }
        // Data had reached the client before the status: never retried, and each one
        // counted when its trailers arrived.
        assert_eq!(unavailable, 5);
        assert_eq!(count(&hits), 5);
    })
    .await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn the_deadline_travels_upstream_reduced() {
    let up = upstream(|req: Request<Incoming>| async move {
        let seen = |name: &str| header(req.headers(), name).to_string();
        Response::builder()
            .header("seen-grpc-timeout", seen("grpc-timeout"))
            .header("seen-timeout-ms", seen("malla-timeout-ms"))
            .body(empty())
            .unwrap()
    })
    .await;
    let (proxy, addr) = proxy_to(up.addr);
    within(async {
        let mut c = client(addr).await;
        let mut req = grpc_call(b"\0\0\0\0\0");
        req.headers_mut()
            .insert("grpc-timeout", "200m".parse().unwrap());
        let resp = c.send_request(req).await.unwrap();
        let seen = header(resp.headers(), "seen-grpc-timeout");
        let left = parse_grpc_timeout(seen.as_bytes()).unwrap();
        assert!(
            left > Duration::ZERO && left < Duration::from_millis(200),
            "{seen}"
        );
        assert_eq!(header(resp.headers(), "seen-timeout-ms"), "");

        let mut req = get("/");
        req.headers_mut()
            .insert("malla-timeout-ms", "1000".parse().unwrap());
        let resp = c.send_request(req).await.unwrap();
        let left: u64 = header(resp.headers(), "seen-timeout-ms").parse().unwrap();
        assert!((1..1000).contains(&left), "{left}");
        assert_eq!(header(resp.headers(), "seen-grpc-timeout"), "");

        // Without the caller's budget, the policy's request timeout (15 s by default)
        // starts one, and what is left of it travels.
        let resp = c.send_request(get("/")).await.unwrap();
        let left: u64 = header(resp.headers(), "seen-timeout-ms").parse().unwrap();
        assert!((1..=15_000).contains(&left), "{left}");
    })
    .await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_passed_deadline_is_deadline_exceeded_and_not_retried() {
    let hits = counter();
    let up = counting(&hits, move |_req| async {
        std::future::pending::<()>().await;
        Response::new(empty())
    })
    .await;
    let (proxy, addr) = proxy_to(up.addr);
    within(async {
        let mut c = client(addr).await;
        let mut req = grpc_call(b"\0\0\0\0\0");
        req.headers_mut()
            .insert("grpc-timeout", "50m".parse().unwrap());
        let resp = c.send_request(req).await.unwrap();
        assert_eq!(header(resp.headers(), "grpc-status"), "4");
        assert_eq!(header(resp.headers(), "malla-error"), "deadline-exceeded");

        // A GET would be retried after a per-try timeout, but not past its deadline.
        let mut req = get("/");
        req.headers_mut()
            .insert("malla-timeout-ms", "50".parse().unwrap());
        let resp = c.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(header(resp.headers(), "malla-error"), "deadline-exceeded");
    })
    .await;
    assert!(count(&hits) <= 2, "{}", count(&hits));
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_post_body_is_replayed_intact_when_non_idempotent_retries_are_on() {
    let (bad_hits, good_hits) = (counter(), counter());
    // `/drain` reads the whole request before failing; other paths fail at once.
    let busy = counting(&bad_hits, move |req: Request<Incoming>| async move {
        if req.uri().path() == "/drain" {
            req.into_body().collect().await.unwrap();
        }
        Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .body(full("busy"))
            .unwrap()
    })
    .await;
    let echo = counting(&good_hits, move |req: Request<Incoming>| async move {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        Response::new(Full::new(body).map_err(|never| match never {}).boxed())
    })
    .await;
    let retry_posts = Policy {
        retries: Retries {
            non_idempotent: true,
            ..Retries::default()
        },
        ..Policy::default()
    };
    let (proxy, addr) = proxy_with(round_robin(&[busy.addr, echo.addr], Some(retry_posts)));
    within(async {
        let mut c = client(addr).await;
        for path in ["/drain", "/at-once", "/drain", "/at-once"] {
            let resp = c.send_request(post_in_two_frames(path)).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "{path}");
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "part-1;part-2;", "{path}");
        }
    })
    .await;
    assert_eq!(count(&bad_hits), 4);
    assert_eq!(count(&good_hits), 4);
    proxy.shutdown().await;

    // By default a POST is not sent twice; nor is a body past `max_replay_bytes`.
    let small_replay = Policy {
        retries: Retries {
            non_idempotent: true,
            max_replay_bytes: 10,
            ..Retries::default()
        },
        ..Policy::default()
    };
    for policy in [None, Some(small_replay)] {
        let (proxy, addr) = proxy_with(round_robin(&[busy.addr, echo.addr], policy.clone()));
        within(async {
            let mut c = client(addr).await;
            let resp = c.send_request(post_in_two_frames("/drain")).await.unwrap();
            assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE, "{policy:?}");
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "busy");
        })
        .await;
        proxy.shutdown().await;
    }
    assert_eq!(count(&good_hits), 4);
}

#[tokio::test]
async fn the_retry_budget_bounds_retries() {
    const REQUESTS: usize = 30;
    let hits = counter();
    let failing = |hits: Arc<AtomicUsize>| {
        move |_req| {
            hits.fetch_add(1, Ordering::SeqCst);
            async {
                Response::builder()
                    .status(StatusCode::SERVICE_UNAVAILABLE)
                    .body(empty())
                    .unwrap()
            }
        }
    };
    let a = upstream(failing(hits.clone())).await;
    let b = upstream(failing(hits.clone())).await;
    // No share of the traffic, 1 retry per second over a 10 s window: 10 retries.
    let policy = Policy {
        retries: Retries {
            budget_ratio: 0.0,
            budget_min_per_second: 1,
            budget_window: Duration::from_secs(10),
            backoff_base: Duration::from_millis(1),
            backoff_max: Duration::from_millis(1),
            ..Retries::default()
        },
        outlier: Outlier {
            enabled: false,
            ..Outlier::default()
        },
        ..Policy::default()
    };
    let (proxy, addr) = proxy_with(round_robin(&[a.addr, b.addr], Some(policy)));
    within(async {
        let mut c = client(addr).await;
        for _ in 0..REQUESTS {
            let resp = c.send_request(get("/")).await.unwrap();
            assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        }
    })
    .await;
    let total = count(&hits);
    assert!(
        (REQUESTS + 1..=REQUESTS + 10).contains(&total),
        "{total} upstream requests for {REQUESTS}"
    );
    let metrics = proxy.metrics().encode();
    let exhausted: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("malla_proxy_retry_budget_exhausted_total{upstream=\"svc\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no retry_budget_exhausted counter in {metrics}"));
    assert!(exhausted > 0, "{metrics}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_injected_abort_never_reaches_the_upstream() {
    let hits = counter();
    let up = counting(&hits, move |_req| async { Response::new(full("reached")) }).await;
    let mut config = UpstreamConfig::new("svc", vec![up.addr.to_string()]);
    config.policy = Some(Policy {
        faults: vec![Fault {
            path_prefix: Some("/pkg.Svc/".into()),
            delay_percent: Percent::default(),
            delay: Duration::ZERO,
            abort_percent: Percent::new(100.0).unwrap(),
            abort_status: 503,
        }],
        ..Policy::default()
    });
    let (proxy, addr) = proxy_with(config);
    within(async {
        let mut c = client(addr).await;
        let resp = c.send_request(grpc_call(b"\0\0\0\0\0")).await.unwrap();
        assert_eq!(header(resp.headers(), "grpc-status"), "14");
        assert_eq!(header(resp.headers(), "malla-error"), "fault-injected");
        // Other paths are not aborted.
        let resp = c.send_request(get("/")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    })
    .await;
    assert_eq!(count(&hits), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_retry_goes_on_with_a_request_body_still_arriving() {
    // The first endpoint refuses the call at once; the retry replays what the client sent
    // so far, then relays the rest of the body as it arrives.
    let unavailable = upstream(|_req| async { grpc_trailers_only("14") }).await;
    let first_frame = Arc::new(Notify::new());
    let echo = upstream({
        let first_frame = first_frame.clone();
        move |req: Request<Incoming>| {
            let first_frame = first_frame.clone();
            async move {
                let mut body = req.into_body();
                let mut message = Vec::new();
                while let Some(frame) = body.frame().await {
                    if let Ok(data) = frame.unwrap().into_data() {
                        message.extend_from_slice(&data);
                        first_frame.notify_one();
                    }
                }
                grpc_reply(Bytes::from(message), "0")
            }
        }
    })
    .await;
    let (proxy, addr) = proxy_with(round_robin(&[unavailable.addr, echo.addr], None));
    within(async {
        let c = client(addr).await;
        let (tx, body) = channel();
        tx.send(data("one;")).await.unwrap();
        let req = Request::post("http://svc.test/pkg.Svc/Stream")
            .header("content-type", "application/grpc")
            .body(body)
            .unwrap();
        let call = tokio::spawn({
            let mut c = c.clone();
            async move { c.send_request(req).await.unwrap() }
        });
        first_frame.notified().await;
        tx.send(data("two;")).await.unwrap();
        drop(tx);
        let resp = call.await.unwrap();
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap();
        assert_eq!(header(&trailers, "grpc-status"), "0");
        assert_eq!(collected.to_bytes(), "one;two;");
    })
    .await;
    proxy.shutdown().await;
}

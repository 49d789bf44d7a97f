#![allow(clippy::unwrap_used)]

use std::time::Duration;

use malla_core::{authz::AuthorizationPolicy, TrustDomain};
use serde_json::json;

use super::*;

fn id(service: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://malla.local/svc/{service}")).unwrap()
}

fn compiled(policy: serde_json::Value) -> CompiledPolicy {
    let policy: AuthorizationPolicy = serde_json::from_value(policy).unwrap();
    policy
        .compile(&TrustDomain::new("malla.local").unwrap())
        .unwrap()
}

/// `payments`: checkout may charge and refund, nobody may reach the admin paths or the
/// admin gRPC service, the metrics port takes anyone; everything else denied.
fn payments() -> CompiledPolicy {
    compiled(json!({
        "service": "payments",
        "default": "deny",
        "rule": [
            {"action": "deny", "paths": ["/admin/*"]},
            {"action": "deny", "grpc": ["payments.v1.Admin/*"]},
            {"action": "allow", "from": ["checkout"], "methods": ["POST"],
             "paths": ["/v1/charges", "/v1/refunds/*"]},
            {"action": "allow", "from": ["checkout"], "grpc": ["payments.v1.Payments/*"]},
            {"action": "allow", "ports": [9100]},
        ]
    }))
}

fn authorizer() -> (Authorizer, Metrics) {
    let metrics = Metrics::new();
    let authorizer = Authorizer::new(ServiceName::new("payments").unwrap(), &metrics);
    (authorizer, metrics)
}

fn http1<'a>(source: Option<&'a SpiffeId>, method: &'a str, target: &'a str) -> Inbound<'a> {
    Inbound::http(
        source,
        8080,
        HttpVersion::Http1,
        method,
        target.as_bytes(),
        Some(b"application/json"),
    )
}

fn grpc<'a>(source: Option<&'a SpiffeId>, path: &'a str) -> Inbound<'a> {
    Inbound::http(
        source,
        8080,
        HttpVersion::Http2,
        "POST",
        path.as_bytes(),
        Some(b"application/grpc"),
    )
}

#[test]
fn without_a_policy_everything_is_allowed_and_nothing_counted() {
    let (authorizer, metrics) = authorizer();
    let checkout = id("checkout");
    for call in [
        http1(None, "DELETE", "/admin/all"),
        grpc(Some(&checkout), "/payments.v1.Admin/Reset"),
        Inbound::tcp(None, 22),
    ] {
        let verdict = authorizer.check(&call);
        assert_eq!(verdict, Verdict::NO_POLICY);
        assert!(verdict.allowed() && !verdict.audit());
    }
    assert_eq!(authorizer.version(), None);
    assert_eq!(
        authorizer.to_json(),
        json!({"service": "payments", "policy": null})
    );
    assert!(
        !metrics.encode().contains("authz_decisions_total{"),
        "{}",
        metrics.encode()
    );
}

#[test]
fn the_policy_in_force_decides_every_protocol() {
    let (authorizer, _metrics) = authorizer();
    authorizer.set(14, Some(payments()));
    assert_eq!(authorizer.version(), Some(14));
    let checkout = id("checkout");
    let orders = id("orders");
    let decide = |call: Inbound<'_>| {
        let v = authorizer.check(&call);
        (v.outcome, v.by)
    };
    use DecidedBy::*;
    use Outcome::*;

    // HTTP: the caller, method and path (its query left out) decide.
    assert_eq!(
        decide(http1(Some(&checkout), "POST", "/v1/charges?idempotency=7")),
        (Allow, Rule(2))
    );
    assert_eq!(
        decide(http1(Some(&checkout), "POST", "/v1/refunds/12")),
        (Allow, Rule(2))
    );
    assert_eq!(
        decide(http1(Some(&checkout), "GET", "/v1/charges")),
        (Deny, Default)
    );
    assert_eq!(
        decide(http1(Some(&orders), "POST", "/v1/charges")),
        (Deny, Default)
    );
    assert_eq!(decide(http1(None, "POST", "/v1/charges")), (Deny, Default));

    // A path is matched as the application reads it: none of these escapes the deny rule.
    for sneaky in [
        "/admin/users",
        "/v1/../admin/users",
        "//admin/users",
        "/./admin/users",
        "/%61dmin/users",
        "/admin%2Fusers",
        "/admin%2fusers",
        "/v1/charges/../../admin/users",
        "http://payments/admin/users",
    ] {
        assert_eq!(
            decide(http1(Some(&checkout), "POST", sneaky)),
            (Deny, Rule(0)),
            "{sneaky}"
        );
    }
    // ... nor does a path dressed up as an allowed one get in.
    assert_eq!(
        decide(http1(Some(&checkout), "POST", "/v1/refunds/../../v2/x")),
        (Deny, Default)
    );

    // gRPC (told by its content type, over HTTP/2 or the HTTP/2 head of `http`).
    assert_eq!(
        decide(grpc(Some(&checkout), "/payments.v1.Payments/Charge")),
        (Allow, Rule(3))
    );
    assert_eq!(
        decide(grpc(Some(&checkout), "/payments.v1.Admin/Reset")),
        (Deny, Rule(1))
    );
    let request = http::Request::builder()
        .method("POST")
        .uri("/payments.v1.Payments/Refund")
        .version(http::Version::HTTP_2)
        .header("content-type", "application/grpc+proto")
        .body(())
        .unwrap();
    let call = Inbound::from_request(Some(&checkout), 8080, &request);
    assert_eq!(call.protocol(), Protocol::Grpc);
    assert_eq!(decide(call), (Allow, Rule(3)));
    // The same path without a gRPC content type is not a gRPC call.
    assert_eq!(
        decide(http1(
            Some(&checkout),
            "POST",
            "/payments.v1.Payments/Charge"
        )),
        (Deny, Default)
    );

    // TCP has no path: the deny rule on paths drops that condition and denies every
    // connection (erring on the side of denying), before the port rule could allow one.
    assert_eq!(decide(Inbound::tcp(None, 9100)), (Deny, Rule(0)));
    assert_eq!(decide(Inbound::tcp(Some(&checkout), 8080)), (Deny, Rule(0)));
    let metrics_port = Inbound::http(None, 9100, HttpVersion::Http1, "GET", b"/metrics", None);
    assert_eq!(decide(metrics_port), (Allow, Rule(4)));

    assert_eq!(
        authorizer
            .check(&http1(None, "GET", "/admin/x"))
            .to_string(),
        "denied by rule[0] of authorization policy version 14"
    );
    assert_eq!(
        authorizer.to_json(),
        json!({"service": "payments",
               "policy": {"version": 14, "mode": "enforce", "default": "deny", "rules": 5}})
    );

    // A deletion: back to allowing everything.
    authorizer.set(0, None);
    assert_eq!(
        authorizer.check(&http1(None, "GET", "/admin/x")),
        Verdict::NO_POLICY
    );
}

#[test]
fn audit_mode_lets_a_denied_call_through_and_says_so() {
    let (authorizer, metrics) = authorizer();
    authorizer.set(
        3,
        Some(compiled(json!({
            "service": "payments", "mode": "audit", "default": "deny",
            "rule": [{"action": "allow", "from": ["checkout"]}]
        }))),
    );
    let checkout = id("checkout");
    let verdict = authorizer.check(&http1(None, "GET", "/"));
    assert_eq!(
        verdict,
        Verdict {
            outcome: Outcome::AuditDeny,
            by: DecidedBy::Default,
            version: Some(3)
        }
    );
    assert!(verdict.allowed() && verdict.audit());
    assert_eq!(
        verdict.to_string(),
        "would be denied (audit) by the default of authorization policy version 3"
    );
    let verdict = authorizer.check(&Inbound::tcp(Some(&checkout), 8080));
    assert_eq!(verdict.outcome, Outcome::Allow);
    assert!(!verdict.audit());

    let text = metrics.encode();
    for line in [
        r#"malla_proxy_inbound_authz_decisions_total{decision="audit_deny",source="unauthenticated",protocol="http1"} 1"#,
        r#"malla_proxy_inbound_authz_decisions_total{decision="allow",source="spiffe://malla.local/svc/checkout",protocol="tcp"} 1"#,
    ] {
        assert!(text.contains(line), "{line} not in\n{text}");
    }
}

#[test]
fn decisions_are_counted_by_caller_within_a_bound() {
    let (authorizer, metrics) = authorizer();
    authorizer.set(1, Some(payments()));
    let checkout = id("checkout");
    for _ in 0..3 {
        authorizer.check(&grpc(Some(&checkout), "/payments.v1.Payments/Charge"));
    }
    authorizer.check(&grpc(Some(&checkout), "/payments.v1.Admin/Reset"));
    let text = metrics.encode();
    for line in [
        r#"{decision="allow",source="spiffe://malla.local/svc/checkout",protocol="grpc"} 3"#,
        r#"{decision="deny",source="spiffe://malla.local/svc/checkout",protocol="grpc"} 1"#,
    ] {
        assert!(text.contains(line), "{line} not in\n{text}");
    }

    // More identities than the bound: the rest share `other`.
    let many: Vec<SpiffeId> = (0..MAX_SOURCES + 10)
        .map(|i| id(&format!("caller-{i}")))
        .collect();
    for caller in &many {
        authorizer.check(&Inbound::tcp(Some(caller), 8080));
    }
    let text = metrics.encode();
    let sources = text
        .lines()
        .filter(|l| l.starts_with("malla_proxy_inbound_authz_decisions_total{"))
        .count();
    // checkout's two series, one per named caller, one `other`.
    assert_eq!(sources, 2 + (MAX_SOURCES - 1) + 1, "series");
    assert!(
        text.contains(r#"{decision="deny",source="other",protocol="tcp"} 11"#),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn denials_are_logged_within_a_budget() {
    let budget = LogBudget::default();
    for _ in 0..DENIAL_LOGS_PER_SECOND {
        assert_eq!(budget.admit(), Some(0));
    }
    for _ in 0..500 {
        assert_eq!(budget.admit(), None, "a flood is not logged");
    }
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(
        budget.admit(),
        Some(500),
        "the next line counts the ones left out"
    );
    assert_eq!(budget.admit(), Some(0));
}

#[test]
fn paths_are_normalised_as_applications_read_them() {
    for (target, path) in [
        ("/", "/"),
        ("", "/"),
        ("*", "*"),
        ("/v1/charges?x=1#f", "/v1/charges"),
        ("/v1//charges", "/v1/charges"),
        ("/v1/./charges/", "/v1/charges/"),
        ("/v1/charges/..", "/v1/"),
        ("/../../etc", "/etc"),
        ("/%7Euser/%41%2d", "/~user/A-"),
        ("/a%2fb", "/a/b"),
        ("/a%20b%3f", "/a%20b%3F"),
        ("/a%2", "/a%252"),
        ("/%%61dmin", "/%25admin"),
        ("/caf%C3%A9", "/caf%C3%A9"),
        ("/café", "/café"),
        ("http://host:80/a/../b?q", "/b"),
        ("http://host", "/"),
        ("/%2e%2e/admin", "/admin"),
    ] {
        assert_eq!(normalize_path(target.as_bytes()), path, "{target}");
    }
    assert!(matches!(
        normalize_path(b"/v1/charges?x"),
        std::borrow::Cow::Borrowed(_)
    ));
}

#[test]
fn grpc_is_told_by_its_content_type() {
    for (content_type, grpc) in [
        ("application/grpc", true),
        ("application/grpc+proto", true),
        ("Application/GRPC; charset=x", true),
        ("application/grpc-web+proto", true),
        ("application/grpcx", false),
        ("application/json", false),
        ("", false),
    ] {
        assert_eq!(is_grpc(content_type.as_bytes()), grpc, "{content_type}");
    }
}

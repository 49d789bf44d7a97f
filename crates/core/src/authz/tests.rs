use super::*;

fn domain() -> TrustDomain {
    TrustDomain::new("malla.local").unwrap()
}

fn id(service: &str) -> SpiffeId {
    SpiffeId::for_service(&domain(), &ServiceName::new(service).unwrap())
}

fn policy(toml_text: &str) -> CompiledPolicy {
    let p: AuthorizationPolicy = toml::from_str(toml_text).unwrap();
    p.compile(&domain()).unwrap()
}

fn http<'a>(source: Option<&'a SpiffeId>, method: &'a str, path: &'a str) -> Request<'a> {
    Request {
        source,
        port: 8080,
        l7: Some(L7 {
            method,
            path,
            grpc: false,
        }),
    }
}

fn grpc<'a>(source: Option<&'a SpiffeId>, path: &'a str) -> Request<'a> {
    Request {
        source,
        port: 8080,
        l7: Some(L7 {
            method: "POST",
            path,
            grpc: true,
        }),
    }
}

fn tcp(source: Option<&SpiffeId>, port: u16) -> Request<'_> {
    Request {
        source,
        port,
        l7: None,
    }
}

const PAYMENTS: &str = r#"
service = "payments"
default = "deny"
mtls = "strict"

[[rule]]
action = "allow"
from = ["checkout"]
methods = ["POST"]
paths = ["/v1/charges", "/v1/refunds/*"]

[[rule]]
action = "allow"
from = ["spiffe://malla.local/svc/web"]
grpc = ["payments.v1.Payments/*"]

[[rule]]
action = "deny"
grpc = ["payments.v1.Payments/Delete"]

[[rule]]
action = "allow"
from = ["*"]
paths = ["/healthz"]
"#;

#[test]
fn the_matrix_of_a_default_deny_policy() {
    let p = policy(PAYMENTS);
    let (checkout, web, other) = (id("checkout"), id("web"), id("orders"));
    let cases: Vec<(&str, Request<'_>, Action, Option<usize>)> = vec![
        (
            "checkout charges",
            http(Some(&checkout), "POST", "/v1/charges"),
            Action::Allow,
            Some(0),
        ),
        (
            "checkout refund",
            http(Some(&checkout), "POST", "/v1/refunds/7"),
            Action::Allow,
            Some(0),
        ),
        (
            "checkout wrong method",
            http(Some(&checkout), "GET", "/v1/charges"),
            Action::Deny,
            None,
        ),
        (
            "checkout wrong path",
            http(Some(&checkout), "POST", "/v1/charges/x"),
            Action::Deny,
            None,
        ),
        (
            "refunds prefix exact",
            http(Some(&checkout), "POST", "/v1/refunds/"),
            Action::Allow,
            Some(0),
        ),
        (
            "refunds without slash",
            http(Some(&checkout), "POST", "/v1/refunds"),
            Action::Deny,
            None,
        ),
        (
            "other service",
            http(Some(&other), "POST", "/v1/charges"),
            Action::Deny,
            None,
        ),
        (
            "plaintext caller",
            http(None, "POST", "/v1/charges"),
            Action::Deny,
            None,
        ),
        (
            "web grpc",
            grpc(Some(&web), "/payments.v1.Payments/Charge"),
            Action::Allow,
            Some(1),
        ),
        (
            "deny wins over allow",
            grpc(Some(&web), "/payments.v1.Payments/Delete"),
            Action::Deny,
            Some(2),
        ),
        (
            "grpc rule is not http",
            http(Some(&web), "POST", "/payments.v1.Payments/Charge"),
            Action::Deny,
            None,
        ),
        (
            "other grpc service",
            grpc(Some(&web), "/payments.v2.Payments/Charge"),
            Action::Deny,
            None,
        ),
        (
            "any authenticated health",
            http(Some(&other), "GET", "/healthz"),
            Action::Allow,
            Some(3),
        ),
        (
            "unauthenticated health",
            http(None, "GET", "/healthz"),
            Action::Deny,
            None,
        ),
        // TCP: allow rules with HTTP conditions never hold; the gRPC deny rule does.
        (
            "tcp from checkout",
            tcp(Some(&checkout), 8080),
            Action::Deny,
            Some(2),
        ),
    ];
    for (name, request, action, rule) in cases {
        let d = p.decide(&request);
        assert_eq!((d.action, d.rule), (action, rule), "{name}: {d}");
        assert!(d.enforced);
        assert_eq!(d.lets_through(), action == Action::Allow, "{name}");
    }
}

#[test]
fn default_allow_ports_tcp_and_audit() {
    let p = policy(
        r#"
        service = "cache"
        mode = "audit"
        [[rule]]
        action = "deny"
        from = ["batch"]
        ports = [6379]
        "#,
    );
    let (batch, web) = (id("batch"), id("web"));
    let d = p.decide(&tcp(Some(&batch), 6379));
    assert_eq!(
        (d.action, d.rule, d.enforced),
        (Action::Deny, Some(0), false)
    );
    assert!(d.lets_through(), "audit lets it through");
    assert_eq!(d.to_string(), "deny by rule[0] (audit)");
    assert_eq!(p.decide(&tcp(Some(&batch), 6380)).action, Action::Allow);
    assert_eq!(p.decide(&tcp(Some(&web), 6379)).action, Action::Allow);
    assert_eq!(
        p.decide(&tcp(None, 6379)).action,
        Action::Allow,
        "no identity: `from` cannot match"
    );
    let d = p.decide(&tcp(Some(&web), 6379));
    assert_eq!(d.to_string(), "allow by default (audit)");
}

#[test]
fn names_resolve_in_this_trust_domain_only() {
    let p = policy(
        r#"
        service = "payments"
        default = "deny"
        [[rule]]
        action = "allow"
        from = ["checkout"]
        "#,
    );
    let foreign = SpiffeId::parse("spiffe://other.example/svc/checkout").unwrap();
    assert_eq!(p.decide(&tcp(Some(&foreign), 1)).action, Action::Deny);
    assert_eq!(
        p.decide(&tcp(Some(&id("checkout")), 1)).action,
        Action::Allow
    );
}

#[test]
fn every_problem_is_named_with_its_field() {
    let p: AuthorizationPolicy = toml::from_str(
        r#"
        service = "Payments"
        [[rule]]
        action = "allow"
        from = ["Checkout", "spiffe://x/svc/a?b", "*"]
        ports = [0, 80]
        methods = ["GET", "BAD METHOD", ""]
        paths = ["v1", "/a*b", "/ok/*", "/q?x=1"]
        grpc = ["pkg.Svc", "pkg.Svc/*", "*", "pkg.Svc/a.b", "/pkg.Svc/M"]
        [[rule]]
        action = "deny"
        from = []
        "#,
    )
    .unwrap();
    let problems = p.validate();
    let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "service",
            "rule[0].from[0]",
            "rule[0].from[1]",
            "rule[0].ports[0]",
            "rule[0].methods[1]",
            "rule[0].methods[2]",
            "rule[0].paths[0]",
            "rule[0].paths[1]",
            "rule[0].paths[3]",
            "rule[0].grpc[0]",
            "rule[0].grpc[3]",
            "rule[0].grpc[4]",
            "rule[1].from",
        ],
        "{problems:#?}"
    );
    assert!(
        problems[1].message.contains("try \"checkout\""),
        "{}",
        problems[1].message
    );
    assert!(problems[12].message.contains("empty list matches nothing"));
    assert!(p.compile(&domain()).is_err());
    // Unknown fields and actions are refused by the reader.
    for bad in [
        "service = \"a\"\n[[rule]]\naction = \"allow\"\nsource = [\"b\"]",
        "service = \"a\"\n[[rule]]\naction = \"permit\"",
        "service = \"a\"\ndefault = \"maybe\"",
    ] {
        assert!(toml::from_str::<AuthorizationPolicy>(bad).is_err(), "{bad}");
    }
}

/// Deny wins and the default decides only when nothing matches, for every combination of
/// a small universe of rules and requests (checked against a direct reading of the rules).
#[test]
fn deny_wins_over_every_combination() {
    let rules = [
        r#"{ action = "allow", from = ["a"] }"#,
        r#"{ action = "deny", from = ["a"], paths = ["/x"] }"#,
        r#"{ action = "allow", paths = ["/x"] }"#,
        r#"{ action = "deny", ports = [2] }"#,
        r#"{ action = "allow", from = ["*"], methods = ["GET"] }"#,
    ];
    let (a, b) = (id("a"), id("b"));
    let sources = [None, Some(&a), Some(&b)];
    let paths = ["/x", "/y"];
    for mask in 0u32..(1 << rules.len()) {
        for default in ["allow", "deny"] {
            let chosen: Vec<&str> = (0..rules.len())
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| rules[i])
                .collect();
            let text = format!(
                "service = \"s\"\ndefault = \"{default}\"\nrule = [{}]",
                chosen.join(", ")
            );
            let p = policy(&text);
            for source in sources {
                for port in [1u16, 2] {
                    for path in paths {
                        for method in ["GET", "POST"] {
                            let request = Request {
                                source,
                                port,
                                l7: Some(L7 {
                                    method,
                                    path,
                                    grpc: false,
                                }),
                            };
                            let d = p.decide(&request);
                            let matching: Vec<usize> = (0..p.policy.rules.len())
                                .filter(|&i| p.matches(i, &p.policy.rules[i], &request))
                                .collect();
                            let deny = matching
                                .iter()
                                .any(|&i| p.policy.rules[i].action == Action::Deny);
                            let allow = matching
                                .iter()
                                .any(|&i| p.policy.rules[i].action == Action::Allow);
                            let expected = if deny {
                                Action::Deny
                            } else if allow {
                                Action::Allow
                            } else {
                                p.policy.default
                            };
                            assert_eq!(d.action, expected, "{text}\n{request:?}");
                            assert_eq!(
                                d.rule.is_none(),
                                matching.is_empty(),
                                "{text}\n{request:?}"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn mutated_policy_documents_hold_the_invariants() {
    check_invariants(PAYMENTS.as_bytes());
    let mut state = 0x6175_7468_7a21u64;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let alphabet = b"[]{}=\",*/ .-_\nabcdefghijklmnopqrstuvwxyz0123456789";
    for _ in 0..3_000 {
        let mut text = PAYMENTS.as_bytes().to_vec();
        for _ in 0..=(next() % 4) {
            let at = (next() as usize) % text.len().max(1);
            match next() % 3 {
                0 => text[at] = alphabet[(next() as usize) % alphabet.len()],
                1 => text.insert(at, alphabet[(next() as usize) % alphabet.len()]),
                _ => {
                    text.remove(at.min(text.len() - 1));
                }
            }
        }
        check_invariants(&text);
    }
}

/// A path that ends in a character of several bytes is checked, not sliced in two (a
/// panic found by `policy::document`'s mutated mixed documents).
#[test]
fn paths_ending_in_any_character_are_checked() {
    for (path, ok) in [
        ("/café", true),
        ("/caf*é", false),
        ("/é*", true),
        ("é", false),
    ] {
        let p = AuthorizationPolicy {
            service: "a".into(),
            default: Action::Allow,
            mode: Mode::Enforce,
            mtls: None,
            rules: vec![Rule {
                action: Action::Allow,
                from: None,
                ports: None,
                methods: None,
                paths: Some(vec![path.into()]),
                grpc: None,
            }],
        };
        assert_eq!(p.validate().is_empty(), ok, "{path}: {:?}", p.validate());
    }
}

#[test]
fn the_mtls_mode_is_optional_and_its_values_are_named() {
    let read = |text: &str| toml::from_str::<AuthorizationPolicy>(text);
    assert_eq!(
        read("service = \"a\"").unwrap().mtls,
        None,
        "the mesh's mode"
    );
    for (value, mode) in [
        ("strict", PeerMtls::Strict),
        ("permissive", PeerMtls::Permissive),
    ] {
        let p = read(&format!("service = \"a\"\nmtls = \"{value}\"")).unwrap();
        assert_eq!(p.mtls, Some(mode));
        assert!(p.validate().is_empty());
        assert_eq!(mode.as_str(), value);
        assert_eq!(value.parse::<PeerMtls>(), Ok(mode));
    }
    // A bad value names the ones allowed, read as TOML (malla apply) or from the CLI flag.
    let err = read("service = \"a\"\nmtls = \"off\"")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unknown variant `off`, expected `permissive` or `strict`"),
        "{err}"
    );
    let err = "Strict".parse::<PeerMtls>().unwrap_err().to_string();
    assert_eq!(
        err,
        "unknown mTLS mode \"Strict\": use `strict` or `permissive`"
    );
    // Not a rule: it does not change a decision (plaintext callers are refused, or not,
    // before the policy is asked).
    let strict = policy("service = \"a\"\nmtls = \"strict\"");
    assert_eq!(strict.decide(&tcp(None, 80)).action, Action::Allow);
    // Written only when set, so that sidecars of earlier versions read the others.
    let p = read("service = \"a\"").unwrap();
    assert!(!toml::to_string(&p).unwrap().contains("mtls"));
    let p = read("service = \"a\"\nmtls = \"permissive\"\n[[rule]]\naction = \"deny\"").unwrap();
    let written = toml::to_string(&p).unwrap();
    assert!(written.contains("mtls = \"permissive\""), "{written}");
    assert_eq!(read(&written).unwrap(), p);
}

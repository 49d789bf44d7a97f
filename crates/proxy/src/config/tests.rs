use super::*;

#[test]
fn full_file_parses_with_defaults() {
    let c = ProxyConfig::from_toml(
        r#"
        workers = 1
        [[upstream]]
        name = "shipping-quote"
        endpoints = ["127.0.0.1:8081", "localhost:8082"]
        balancer = "round-robin"
        connect_timeout = "250ms"

        [[outbound]]
        listen = "127.0.0.1:4140"
        upstream = "shipping-quote"

        [http_proxy]
        listen = "127.0.0.1:4141"
        [[http_proxy.route]]
        host = "quote.example"
        upstream = "shipping-quote"

        [inbound]
        listen = "127.0.0.1:4143"
        forward_to = "127.0.0.1:8080"

        [admin]
        listen = "127.0.0.1:9901"
        "#,
        "test.toml",
    )
    .unwrap();
    let u = &c.upstreams[0];
    assert_eq!(u.balancer, BalancerKind::RoundRobin);
    assert_eq!(u.connect_timeout, Duration::from_millis(250));
    assert_eq!(u.response_timeout, defaults::response_timeout());
    assert_eq!(c.outbound[0].protocol, ListenerProtocol::Auto);
    assert_eq!(c.limits, Limits::default());
    // Left out, the inbound mTLS mode is the control plane's (or permissive without one).
    assert_eq!(c.inbound.as_ref().unwrap().mtls, None);
}

#[test]
fn the_inbound_mtls_mode_is_a_local_override_when_set() {
    let inbound = |mtls: &str| {
        ProxyConfig::from_toml(
            &format!(
                "[inbound]\nlisten = \"127.0.0.1:4143\"\nforward_to = \"127.0.0.1:8080\"\n{mtls}"
            ),
            "x.toml",
        )
        .map(|c| c.inbound.unwrap().mtls)
    };
    assert_eq!(inbound("").unwrap(), None);
    for (value, mode) in [
        ("strict", MtlsMode::Strict),
        ("permissive", MtlsMode::Permissive),
        ("off", MtlsMode::Off),
    ] {
        assert_eq!(inbound(&format!("mtls = \"{value}\"")).unwrap(), Some(mode));
        assert_eq!(mode.as_str(), value);
    }
    let err = inbound("mtls = \"required\"").unwrap_err().to_string();
    assert!(
        err.contains("unknown variant `required`, expected one of `permissive`, `strict`, `off`"),
        "{err}"
    );
    // Written back only when set (`/config` shows the raw configuration).
    let c = ProxyConfig::from_toml(
        "[inbound]\nlisten = \"127.0.0.1:4143\"\nforward_to = \"127.0.0.1:8080\"\n",
        "x.toml",
    )
    .unwrap();
    assert!(serde_json::to_value(&c).unwrap()["inbound"]
        .get("mtls")
        .is_none());
}

#[test]
fn syntax_errors_name_file_and_line() {
    let err = ProxyConfig::from_toml("workers = 1\n[[upstream]]\nname = \n", "mesh.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("mesh.toml"), "{err}");
    assert!(err.contains("line 3"), "{err}");
}

#[test]
fn unknown_fields_and_bad_durations_are_rejected() {
    let err = ProxyConfig::from_toml("[[upstream]]\nname = \"a\"\nendpionts = []\n", "x.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("endpionts"), "{err}");
    // At any depth of an upstream's policy too (a sidecar's own file is strict).
    let err = ProxyConfig::from_toml(
        "[[upstream]]\nname = \"a\"\nendpoints = [\"127.0.0.1:1\"]\n[upstream.policy.retries]\nmax_attempts = 2\nmax_attemps = 2\n",
        "x.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(
            "line 6, column 1: upstream[0].policy.retries.max_attemps: unknown field `max_attemps`"
        ),
        "{err}"
    );
    let err = ProxyConfig::from_toml(
        "[[upstream]]\nname = \"a\"\nconnect_timeout = \"soon\"\n",
        "x.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("invalid duration \"soon\""), "{err}");
}

#[test]
fn all_semantic_problems_are_reported_together() {
    let err = ProxyConfig::from_toml(
        r#"
        [[upstream]]
        name = "Bad_Name"
        endpoints = ["nowhere", "127.0.0.1:0"]
        [[upstream]]
        name = "Bad_Name"
        [[outbound]]
        listen = "127.0.0.1:1"
        upstream = "missing"
        "#,
        "x.toml",
    )
    .unwrap_err();
    assert_eq!(err.problems.len(), 6, "{err}");
    let text = err.to_string();
    assert!(text.contains("upstream[0].name \"Bad_Name\""), "{text}");
    assert!(text.contains("outbound[0].upstream \"missing\""), "{text}");
    assert!(text.contains("endpoints[1]"), "{text}");
}

#[test]
fn control_section_and_discovered_upstreams_parse() {
    let c = ProxyConfig::from_toml(
        r#"
        [control]
        url = "http://127.0.0.1:7781"
        service = "checkout"
        labels = { env = "prod", "malla.dev/zone" = "eu-1" }
        lease_ttl = "15s"

        [[upstream]]
        name = "quote"
        service = "shipping-quote"
        selector = "env=prod,zone in (eu-1,eu-2)"

        [[upstream]]
        name = "inventory"

        [[upstream]]
        name = "static"
        endpoints = ["127.0.0.1:9000"]

        [[outbound]]
        listen = "127.0.0.1:4140"
        upstream = "quote"

        [inbound]
        listen = "127.0.0.1:4143"
        forward_to = "127.0.0.1:8080"
        "#,
        "mesh.toml",
    )
    .unwrap();
    let control = c.control.as_ref().unwrap();
    assert_eq!(control.lease_ttl, Duration::from_secs(15));
    assert_eq!(control.connect_timeout, defaults::connect_timeout());
    assert_eq!(control.endpoint().unwrap(), "http://127.0.0.1:7781");
    assert_eq!(c.upstreams[0].discovery_service(), "shipping-quote");
    assert_eq!(c.upstreams[1].discovery_service(), "inventory");
    let discovered: Vec<_> = c
        .upstreams
        .iter()
        .filter(|u| u.is_discovered(true))
        .map(|u| u.name.as_str())
        .collect();
    assert_eq!(discovered, ["quote", "inventory"]);
    // Printing the effective configuration and reading it back gives the same.
    let printed = toml::to_string_pretty(&c).unwrap();
    assert_eq!(ProxyConfig::from_toml(&printed, "printed").unwrap(), c);
}

#[test]
fn control_urls() {
    let url = |u: &str| ControlPlaneConfig::new(u).endpoint();
    // HOST:PORT and https:// are TLS; http:// is plaintext.
    assert_eq!(url("127.0.0.1:7781").unwrap(), "https://127.0.0.1:7781");
    assert_eq!(url("https://c:7781/").unwrap(), "https://c:7781");
    assert_eq!(url("[::1]:7780").unwrap(), "https://[::1]:7780");
    assert_eq!(
        url("http://control.mesh:7781/").unwrap(),
        "http://control.mesh:7781"
    );
    let target = ControlPlaneConfig::new("control.mesh:7780")
        .target()
        .unwrap();
    assert!(target.tls);
    assert_eq!(target.authority, "control.mesh:7780");
    assert!(!ControlPlaneConfig::new("http://c:1").target().unwrap().tls);
    assert!(url("http://c").unwrap_err().contains("no port"));
    assert!(url("c").unwrap_err().contains("no port"));
    assert!(url("http://c:1/v1").unwrap_err().contains("no path"));
    assert!(url("ftp://c:1").unwrap_err().contains("http://HOST:PORT"));
    assert!(url("http://").is_err());
}

/// The listener and upstream every `[control]` test below shares.
const DISCOVERING: &str = r#"
    [[upstream]]
    name = "quote"

    [[outbound]]
    listen = "127.0.0.1:4140"
    upstream = "quote"
"#;

#[test]
fn tls_to_the_control_plane_needs_its_roots() {
    for url in ["127.0.0.1:7780", "https://127.0.0.1:7780"] {
        let err = ProxyConfig::from_toml(
            &format!("[control]\nurl = {url:?}\n{DISCOVERING}"),
            "mesh.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("is reached over TLS"), "{err}");
        for way in [
            "--control-ca",
            "MALLA_CONTROL_CA",
            "ca_file",
            "trust-bundle.pem",
        ] {
            assert!(err.contains(way), "{way}: {err}");
        }
    }
    // The bundle of the control plane's data directory...
    let c = ProxyConfig::from_toml(
        &format!("[control]\nca_file = \"/var/lib/malla/trust-bundle.pem\"\n{DISCOVERING}"),
        "mesh.toml",
    )
    .unwrap();
    let control = c.control.as_ref().unwrap();
    assert_eq!(
        control.ca_file.as_deref(),
        Some(Path::new("/var/lib/malla/trust-bundle.pem"))
    );
    let printed = toml::to_string_pretty(&c).unwrap();
    assert!(printed.contains("ca_file"), "{printed}");
    assert_eq!(ProxyConfig::from_toml(&printed, "printed").unwrap(), c);
    // ...or plaintext, which needs none.
    ProxyConfig::from_toml(
        &format!("[control]\nurl = \"http://127.0.0.1:7780\"\n{DISCOVERING}"),
        "mesh.toml",
    )
    .unwrap();
}

#[test]
fn a_certificate_kept_in_the_identity_dir_brings_the_roots() {
    let dir = std::env::temp_dir().join(format!("malla-config-kept-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = format!(
        "[control]\nservice = \"checkout\"\nregister_address = \"10.0.0.5:4143\"\n\
         identity_dir = {:?}\n{DISCOVERING}",
        dir.display().to_string()
    );
    // Nothing kept yet: the roots must come from a file.
    let err = ProxyConfig::from_toml(&text, "mesh.toml").unwrap_err();
    assert!(err.to_string().contains("--control-ca"), "{err}");
    std::fs::write(crate::discovery::kept_bundle(&dir), "kept").unwrap();
    ProxyConfig::from_toml(&text, "mesh.toml").unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn discovery_and_registration_problems_are_named() {
    let err = ProxyConfig::from_toml(
        r#"
        [[upstream]]
        name = "a"
        endpoints = ["127.0.0.1:1"]
        selector = "env=prod"
        [[upstream]]
        name = "b"
        selector = "env in prod"
        [[upstream]]
        name = "c"
        service = "Bad"
        [[outbound]]
        listen = "127.0.0.1:1"
        upstream = "a"
        "#,
        "x.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("upstream[0] (\"a\") has both static endpoints and discovery keys (selector)"),
        "{err}"
    );
    assert!(
        err.contains("upstream[1].selector: invalid selector \"env in prod\" at position 7"),
        "{err}"
    );
    assert!(
        err.contains("upstream[1].selector needs the control plane"),
        "{err}"
    );
    assert!(err.contains("upstream[2].service \"Bad\""), "{err}");

    let base =
        "[[upstream]]\nname = \"a\"\n[[outbound]]\nlisten = \"127.0.0.1:1\"\nupstream = \"a\"\n";
    let cases = [
        (
            "[control]\nurl = \"https://c:1\"\n",
            "control.url \"https://c:1\" is reached over TLS",
        ),
        (
            "[control]\nurl = \"http://c:1\"\nservice = \"me\"\n",
            "control.service: registering needs the address",
        ),
        (
            "[control]\nurl = \"http://c:1\"\nservice = \"me\"\n[inbound]\nlisten = \"0.0.0.0:4143\"\nforward_to = \"127.0.0.1:8080\"\n",
            "wildcard address",
        ),
        (
            "[control]\nurl = \"http://c:1\"\nservice = \"me\"\nregister_address = \"0.0.0.0:80\"\n",
            "control.register_address 0.0.0.0:80",
        ),
        (
            "[control]\nurl = \"http://c:1\"\nlabels = { env = \"x y\" }\n",
            "control.labels: invalid value \"x y\"",
        ),
        (
            "[control]\nurl = \"http://c:1\"\ninstance_id = \"me-1\"\n",
            "control.instance_id describes the registered instance",
        ),
        (
            "[control]\nurl = \"http://c:1\"\nservice = \"me\"\ninstance_id = \"a/b\"\nregister_address = \"10.0.0.1:80\"\n",
            "control.instance_id \"a/b\"",
        ),
        (
            "[control]\nurl = \"http://c:1\"\nlease_ttl = \"1500ms\"\n",
            "control.lease_ttl 1s 500ms: use whole seconds",
        ),
    ];
    for (section, expected) in cases {
        let err = ProxyConfig::from_toml(&format!("{base}{section}"), "x.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{expected:?} not in {err}");
    }
    // Discovery alone needs no address.
    ProxyConfig::from_toml(
        &format!("{base}[control]\nurl = \"http://c:1\"\n"),
        "x.toml",
    )
    .unwrap();
}

#[test]
fn names_are_dns_labels() {
    assert!(is_dns_label("shipping-quote"));
    assert!(is_dns_label("a1"));
    assert!(!is_dns_label(""));
    assert!(!is_dns_label("1a"));
    assert!(!is_dns_label("a-"));
    assert!(!is_dns_label("A"));
    assert!(!is_dns_label(&"a".repeat(64)));
}

#[test]
fn the_control_url_defaults_to_the_control_planes_one_port() {
    let c = ProxyConfig::from_toml(
        &format!("[control]\nca_file = \"trust-bundle.pem\"\n{DISCOVERING}"),
        "mesh.toml",
    )
    .unwrap();
    let control = c.control.unwrap();
    assert_eq!(control.url, "127.0.0.1:7780");
    assert_eq!(control.endpoint().unwrap(), "https://127.0.0.1:7780");
}

#[test]
fn a_join_token_needs_a_service_and_one_source() {
    let base = r#"
        [[upstream]]
        name = "quote"
        endpoints = ["127.0.0.1:1"]

        [[outbound]]
        listen = "127.0.0.1:4140"
        upstream = "quote"
    "#;
    let err = ProxyConfig::from_toml(
        &format!("[control]\njoin_token = \"malla_join_x\"\n{base}"),
        "mesh.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("control.join_token describes the registered instance"),
        "{err}"
    );
    let err = ProxyConfig::from_toml(
        &format!(
            "[control]\nservice = \"checkout\"\nregister_address = \"127.0.0.1:4143\"\n\
             join_token = \"malla_join_x\"\njoin_token_file = \"/run/token\"\n{base}"
        ),
        "mesh.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("both set: keep one"), "{err}");

    // From a file, trimmed; never printed back.
    let dir = std::env::temp_dir().join(format!("malla-join-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("token");
    std::fs::write(&file, "  malla_join_abc\n").unwrap();
    let c = ProxyConfig::from_toml(
        &format!(
            "[control]\nservice = \"checkout\"\nregister_address = \"127.0.0.1:4143\"\n\
             ca_file = \"trust-bundle.pem\"\njoin_token_file = {:?}\n{base}",
            file.display().to_string()
        ),
        "mesh.toml",
    )
    .unwrap();
    let control = c.control.clone().unwrap();
    assert_eq!(
        control.join_token().unwrap().as_deref(),
        Some("malla_join_abc")
    );
    std::fs::write(&file, "\n").unwrap();
    assert!(control
        .join_token()
        .unwrap_err()
        .contains("the file is empty"));
    let mut with_token = c;
    with_token.control.as_mut().unwrap().join_token = Some("malla_join_secret".into());
    assert!(!toml::to_string(&with_token)
        .unwrap()
        .contains("malla_join_secret"));
    let _ = std::fs::remove_dir_all(&dir);
}

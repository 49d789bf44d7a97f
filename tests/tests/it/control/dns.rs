//! The DNS interface through the real server and a real resolver tool, `dig` (which
//! `scripts/test` installs).

use std::{net::SocketAddr, process::Command};

use malla_tests::{assert_eventually, control::TestControl};
use serde_json::json;

/// `dig @ADDR -p PORT NAME TYPE` with `options`; stdout. Panics (with what to do) when dig
/// is missing.
async fn dig(server: SocketAddr, name: &str, rtype: &str, options: &[&str]) -> String {
    let mut cmd = Command::new("dig");
    cmd.arg(format!("@{}", server.ip()))
        .arg("-p")
        .arg(server.port().to_string())
        .args(["+time=2", "+tries=2"])
        .args(options)
        .arg(name)
        .arg(rtype);
    let output = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run dig ({e}): the DNS tests query the server with it; run scripts/test, \
                 which installs it (Debian/Ubuntu: apt-get install dnsutils)"
            )
        });
    assert!(
        output.status.success(),
        "dig {name} {rtype} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The sorted `+short` answer lines.
async fn short(server: SocketAddr, name: &str, rtype: &str) -> Vec<String> {
    let out = dig(server, name, rtype, &["+short"]).await;
    let mut lines: Vec<String> = out.lines().map(str::to_string).collect();
    lines.sort();
    lines
}

/// The `status:` of the answer's header (`NOERROR`, `NXDOMAIN`...).
async fn rcode(server: SocketAddr, name: &str) -> String {
    let out = dig(server, name, "A", &["+noall", "+comments"]).await;
    out.split("status: ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_else(|| panic!("no status in dig's answer:\n{out}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_finds_registered_services() {
    let control = TestControl::start().await;
    let api = control.api();
    let dns = control.dns_addr();
    for (id, address, env) in [
        ("q-1", "127.0.0.2", "prod"),
        ("q-2", "127.0.0.3", "prod"),
        ("q-3", "127.0.0.4", "dev"),
    ] {
        api.register(
            "shipping-quote",
            id,
            &json!({"address": address, "port": 8080, "labels": {"env": env, "zone": "eu-1"}}),
        )
        .await;
    }

    assert_eq!(
        short(dns, "shipping-quote.svc.malla", "A").await,
        ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    );
    assert_eq!(
        short(dns, "prod.env.shipping-quote.svc.malla", "A").await,
        ["127.0.0.2", "127.0.0.3"]
    );
    assert_eq!(
        short(dns, "dev.env.eu-1.zone.shipping-quote.svc.malla.", "A").await,
        ["127.0.0.4"]
    );
    // Names are case-insensitive.
    assert_eq!(
        short(dns, "DEV.Env.Shipping-Quote.svc.malla", "A").await,
        ["127.0.0.4"]
    );
    // SRV: one per instance, with the port.
    let srv = short(dns, "_http._tcp.prod.env.shipping-quote.svc.malla", "SRV").await;
    assert_eq!(srv.len(), 2, "{srv:?}");
    assert!(srv.iter().all(|r| r.starts_with("0 1 8080 ")), "{srv:?}");

    assert_eq!(rcode(dns, "shipping-quote.svc.malla").await, "NOERROR");
    assert_eq!(rcode(dns, "nope.svc.malla").await, "NXDOMAIN");
    assert_eq!(rcode(dns, "odd.shipping-quote.svc.malla").await, "NXDOMAIN");
    // A filter nothing matches: the name exists, with no address (NODATA).
    assert_eq!(
        rcode(dns, "test.env.shipping-quote.svc.malla").await,
        "NOERROR"
    );
    assert!(short(dns, "test.env.shipping-quote.svc.malla", "A")
        .await
        .is_empty());
    // Not this server's zone.
    assert_eq!(rcode(dns, "example.com").await, "REFUSED");

    // Changes show at once.
    api.deregister("shipping-quote", "q-1").await;
    assert_eventually!(short(dns, "prod.env.shipping-quote.svc.malla", "A").await == ["127.0.0.3"]);
}

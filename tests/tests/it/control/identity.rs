//! Identity: the control plane's certificate authority, checked with implementations that
//! share no code with it. `openssl` (the command) makes keys and CSRs, and verifies and
//! reads what the CA issues; rcgen makes the CSRs a sidecar would send over gRPC.
//!
//! - an openssl CSR asking for another name gets `spiffe://malla.local/svc/checkout` (a
//!   critical URI SAN, no subject, serverAuth + clientAuth) that `openssl verify` accepts;
//!   renewal with the same key works, with another key it is refused;
//! - every refusal (token used, for another service, unknown, expired; no credential; a
//!   malformed, tampered, RSA or secp256k1 CSR) with its status and a message saying why;
//! - gRPC `Certify` with an rcgen CSR; `PERMISSION_DENIED` for a used token;
//! - the root survives a restart (same bundle; a certificate issued before renews after),
//!   its key is mode 0600;
//! - an operator's CA (`--ca-cert`, `--ca-key`): an intermediate made by openssl issues
//!   chains that verify up to its root, and certificates it signed that are expired, of
//!   another trust domain or not the mesh's are refused for renewal.
//!
//! Needs `openssl` on `PATH` (`scripts/test` installs it).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http::Method;
use malla_api::{identity_pb as pb, IdentityClient};
use malla_control::{
    server::{Control, ControlConfig, DnsSettings, IdentitySettings},
    serving::ServeSettings,
    store::Store as _,
};
use malla_core::TrustDomain;
use malla_tests::{
    assert_eventually,
    control::{
        api::{Api, Reply},
        TempDir, TestControl,
    },
};
use serde_json::{json, Value};
use tonic::Code;

const CHECKOUT_ID: &str = "spiffe://malla.local/svc/checkout";
const TOKENS: &str = "/malla/identity/join-tokens/";

// ---------------------------------------------------------------------------------------
// openssl, in a directory of its own

/// A temporary directory where `openssl` runs and keeps its files.
struct Openssl {
    dir: TempDir,
}

impl Openssl {
    fn new() -> Openssl {
        Openssl {
            dir: TempDir::new("openssl"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn output(&self, args: &[&str]) -> Output {
        Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run openssl ({e}): install it (Debian: apt-get install openssl)")
            })
    }

    /// Runs `openssl ARGS...`; panics with its output when it fails; returns its stdout.
    #[track_caller]
    fn run(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "openssl {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn write(&self, name: &str, text: impl AsRef<[u8]>) {
        std::fs::write(self.path(name), text).unwrap();
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap()
    }

    /// `NAME.key` (a new key: `ec:P-256`, `ec:P-384`, `ec:secp256k1`, `ed25519`, `rsa`)
    /// and `NAME.csr`, which asks for a DNS name and a subject the CA must ignore; returns
    /// the CSR (PEM).
    fn new_key_and_csr(&self, name: &str, kind: &str) -> String {
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let curve = kind
            .strip_prefix("ec:")
            .map(|c| format!("ec_paramgen_curve:{c}"));
        let mut args = vec!["req", "-new", "-nodes", "-keyout", &key, "-out", &csr];
        match &curve {
            Some(curve) => args.extend(["-newkey", "ec", "-pkeyopt", curve]),
            None if kind == "rsa" => args.extend(["-newkey", "rsa:2048"]),
            None => args.extend(["-newkey", kind]),
        }
        args.extend([
            "-subj",
            "/CN=whatever",
            "-addext",
            "subjectAltName=DNS:evil.example,URI:spiffe://malla.local/svc/admin",
        ]);
        self.run(&args);
        self.read(&csr)
    }

    /// A new CSR (`CSR_NAME.csr`) signed by the existing `KEY_NAME.key`; returns it.
    fn csr_for_key(&self, key_name: &str, csr_name: &str) -> String {
        let key = format!("{key_name}.key");
        let csr = format!("{csr_name}.csr");
        self.run(&[
            "req",
            "-new",
            "-key",
            &key,
            "-subj",
            "/CN=renewal",
            "-out",
            &csr,
        ]);
        self.read(&csr)
    }

    /// `openssl verify` of the first certificate of `leaf` against the roots in `bundle`,
    /// with the rest of `chain` as untrusted intermediates, strictly (RFC 5280), for the
    /// purpose given (`sslclient`, `sslserver`); the combined output.
    fn verify(&self, bundle: &str, chain: &str, leaf: &str, purpose: &str) -> (bool, String) {
        let out = self.output(&[
            "verify",
            "-x509_strict",
            "-purpose",
            purpose,
            "-CAfile",
            bundle,
            "-untrusted",
            chain,
            leaf,
        ]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// Asserts that `leaf` verifies up to `bundle` for both TLS client and server use.
    #[track_caller]
    fn assert_verifies(&self, bundle: &str, chain: &str, leaf: &str) {
        for purpose in ["sslclient", "sslserver"] {
            let (ok, text) = self.verify(bundle, chain, leaf, purpose);
            assert!(
                ok && text.trim() == format!("{leaf}: OK"),
                "openssl verify -purpose {purpose} of {leaf}: {text}\n{}",
                self.run(&["x509", "-in", leaf, "-noout", "-text"])
            );
        }
    }

    /// Writes the PEM blocks of an issued chain as `NAME.chain.pem` (all of them) and
    /// `NAME.pem` (the leaf), and the bundle as `NAME.bundle.pem`.
    fn save_issued(&self, name: &str, issued: &Value) {
        let chain = issued["certificate_chain_pem"].as_str().expect("a chain");
        let bundle = issued["trust_bundle_pem"].as_str().expect("a bundle");
        self.write(&format!("{name}.chain.pem"), chain);
        self.write(&format!("{name}.pem"), &certs(chain)[0]);
        self.write(&format!("{name}.bundle.pem"), bundle);
    }

    /// The DER of `NAME` (`x509` or `req`) converted to PEM by openssl, in `NAME.pem`.
    fn der_to_pem(&self, what: &str, name: &str, der: &[u8]) -> String {
        let der_file = format!("{name}.der");
        let pem_file = format!("{name}.pem");
        self.write(&der_file, der);
        self.run(&[what, "-inform", "DER", "-in", &der_file, "-out", &pem_file]);
        self.read(&pem_file)
    }
}

/// The PEM certificates in `text`, in order, each ending with a newline.
fn certs(text: &str) -> Vec<String> {
    text.split_inclusive("-----END CERTIFICATE-----")
        .filter(|block| block.contains("-----BEGIN CERTIFICATE-----"))
        .map(|block| format!("{}\n", block.trim_start()))
        .collect()
}

/// PEM with the line ends normalised, to compare two encodings of the same blocks.
fn unix(text: &str) -> String {
    text.replace("\r\n", "\n").trim().to_string()
}

// ---------------------------------------------------------------------------------------
// The HTTP API

/// `POST /v1/tokens`; asserts 201 and returns the answer.
async fn create_token(api: &Api, service: &str, ttl: Option<&str>) -> Value {
    let mut body = json!({"service": service});
    if let Some(ttl) = ttl {
        body["ttl"] = json!(ttl);
    }
    let reply = api
        .request(Method::POST, "/v1/tokens", body.to_string())
        .await;
    assert_eq!(reply.status, 201, "{reply}");
    reply.json
}

async fn token(api: &Api, service: &str) -> String {
    create_token(api, service, None).await["token"]
        .as_str()
        .expect("a token")
        .to_string()
}

async fn post(api: &Api, path: &str, body: &Value) -> Reply {
    api.request(Method::POST, path, body.to_string()).await
}

async fn certify(api: &Api, body: &Value) -> Reply {
    post(api, "/v1/certificates", body).await
}

/// A certificate for `service` with a join token; asserts 200.
async fn certify_with_token(api: &Api, service: &str, csr: &str, token: &str) -> Value {
    certify(
        api,
        &json!({"service": service, "csr": csr, "join_token": token}),
    )
    .await
    .ok()
}

async fn token_records(control: &TestControl) -> Vec<(String, String)> {
    let (kvs, _) = control
        .registry()
        .store()
        .range(TOKENS)
        .await
        .expect("read the store");
    kvs.into_iter()
        .map(|kv| (kv.key, String::from_utf8_lossy(&kv.value).into_owned()))
        .collect()
}

fn unix_ms_now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

// ---------------------------------------------------------------------------------------
// Issuing and renewing, checked by openssl

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openssl_csr_gets_the_service_identity_and_openssl_verifies_it() {
    let control = TestControl::start_without_dns().await;
    let api = control.api();
    let ssl = Openssl::new();

    let identity = api.get("/v1/identity").await.ok();
    assert_eq!(identity["trust_domain"], "malla.local");
    assert_eq!(identity["cert_ttl_seconds"], 24 * 3600);
    let bundle = identity["trust_bundle_pem"].as_str().unwrap().to_string();
    assert_eq!(certs(&bundle).len(), 1, "one root: {bundle}");

    let created = create_token(&api, "checkout", Some("15m")).await;
    let token = created["token"].as_str().unwrap();
    assert!(token.starts_with("malla_join_"), "{created}");
    assert_eq!(created["service"], "checkout");
    assert_eq!(created["spiffe_id"], CHECKOUT_ID);
    assert_eq!(created["ttl_seconds"], 900);
    assert!(
        created["expires_at"].as_str().unwrap().ends_with('Z'),
        "{created}"
    );

    // The CSR asks for a DNS name, another SPIFFE ID and a subject: none of it is granted.
    let csr = ssl.new_key_and_csr("leaf", "ec:P-256");
    let issued = certify_with_token(&api, "checkout", &csr, token).await;
    assert_eq!(issued["spiffe_id"], CHECKOUT_ID);
    assert_eq!(
        unix(issued["trust_bundle_pem"].as_str().unwrap()),
        unix(&bundle)
    );
    assert_eq!(
        certs(issued["certificate_chain_pem"].as_str().unwrap()).len(),
        1,
        "the leaf alone under a generated root: {issued}"
    );
    for field in ["not_before", "not_after"] {
        assert!(issued[field].as_str().unwrap().ends_with('Z'), "{issued}");
    }
    ssl.save_issued("leaf", &issued);
    ssl.assert_verifies("leaf.bundle.pem", "leaf.chain.pem", "leaf.pem");

    let san = ssl.run(&[
        "x509",
        "-in",
        "leaf.pem",
        "-noout",
        "-ext",
        "subjectAltName",
    ]);
    assert_eq!(
        san.lines().map(str::trim).collect::<Vec<_>>(),
        [
            "X509v3 Subject Alternative Name: critical",
            "URI:spiffe://malla.local/svc/checkout"
        ],
        "{san}"
    );
    let text = ssl.run(&["x509", "-in", "leaf.pem", "-noout", "-text"]);
    for absent in ["evil.example", "whatever", "svc/admin"] {
        assert!(!text.contains(absent), "{absent} granted:\n{text}");
    }
    assert_eq!(
        ssl.run(&["x509", "-in", "leaf.pem", "-noout", "-subject"])
            .trim(),
        "subject=",
        "no subject: the identity is the URI SAN"
    );
    let eku = ssl.run(&[
        "x509",
        "-in",
        "leaf.pem",
        "-noout",
        "-ext",
        "extendedKeyUsage",
    ]);
    assert!(
        eku.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{eku}"
    );
    let basic = ssl.run(&[
        "x509",
        "-in",
        "leaf.pem",
        "-noout",
        "-ext",
        "basicConstraints",
    ]);
    assert!(basic.contains("CA:FALSE"), "{basic}");
    // The certificate is for the key openssl made.
    assert_eq!(
        ssl.run(&["x509", "-in", "leaf.pem", "-noout", "-pubkey"]),
        ssl.run(&["pkey", "-in", "leaf.key", "-pubout"])
    );
    // 24 h: valid for more than 23.9 h from now, not for 24 h and 2 minutes.
    ssl.run(&["x509", "-in", "leaf.pem", "-noout", "-checkend", "86000"]);
    let out = ssl.output(&["x509", "-in", "leaf.pem", "-noout", "-checkend", "86520"]);
    assert!(!out.status.success(), "valid for longer than 24 h");
    let root = ssl.run(&["x509", "-in", "leaf.bundle.pem", "-noout", "-subject"]);
    assert!(root.contains("malla root CA malla.local"), "{root}");

    // Renewal: the current certificate and a new CSR from the same key.
    let leaf_pem = ssl.read("leaf.pem");
    let renew_csr = ssl.csr_for_key("leaf", "renew");
    let renewed = certify(
        &api,
        &json!({"service": "checkout", "csr": renew_csr, "certificate": leaf_pem}),
    )
    .await
    .ok();
    assert_eq!(renewed["spiffe_id"], CHECKOUT_ID);
    ssl.save_issued("renewed", &renewed);
    ssl.assert_verifies("renewed.bundle.pem", "renewed.chain.pem", "renewed.pem");
    assert_ne!(
        ssl.run(&["x509", "-in", "renewed.pem", "-noout", "-serial"]),
        ssl.run(&["x509", "-in", "leaf.pem", "-noout", "-serial"]),
        "a renewal is a new certificate"
    );
    assert_eq!(
        ssl.run(&["x509", "-in", "renewed.pem", "-noout", "-pubkey"]),
        ssl.run(&["pkey", "-in", "leaf.key", "-pubout"])
    );
    // The renewed certificate renews too.
    let renewed_pem = ssl.read("renewed.pem");
    let again = certify(
        &api,
        &json!({"service": "checkout", "csr": renew_csr, "certificate": renewed_pem}),
    )
    .await
    .ok();
    assert_eq!(again["spiffe_id"], CHECKOUT_ID);

    // A CSR from another key: the certificate alone (public) proves nothing.
    let other_csr = ssl.new_key_and_csr("other", "ec:P-256");
    let reply = certify(
        &api,
        &json!({"service": "checkout", "csr": other_csr, "certificate": leaf_pem}),
    )
    .await;
    let message = reply.error(403, "permission_denied");
    assert!(
        message.contains("the CSR's key is not the current certificate's"),
        "{message}"
    );

    // The right key, another service: a renewal keeps the identity it had.
    let reply = certify(
        &api,
        &json!({"service": "payments", "csr": renew_csr, "certificate": leaf_pem}),
    )
    .await;
    let message = reply.error(403, "permission_denied");
    assert!(
        message.contains("spiffe://malla.local/svc/checkout's identity, not payments's"),
        "{message}"
    );

    // A certificate that says the right thing but that the CA did not sign.
    ssl.run(&[
        "req",
        "-x509",
        "-key",
        "leaf.key",
        "-subj",
        "/CN=forged",
        "-addext",
        "subjectAltName=critical,URI:spiffe://malla.local/svc/checkout",
        "-days",
        "1",
        "-out",
        "forged.pem",
    ]);
    let reply = certify(
        &api,
        &json!({"service": "checkout", "csr": renew_csr, "certificate": ssl.read("forged.pem")}),
    )
    .await;
    let message = reply.error(403, "permission_denied");
    assert!(
        message.contains("not issued by this mesh's CA"),
        "{message}"
    );
}

/// P-384 and Ed25519 keys are certified as P-256 ones are; RSA and secp256k1 are refused
/// with the keys to use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supported_and_unsupported_keys() {
    let control = TestControl::start_without_dns().await;
    let api = control.api();
    let ssl = Openssl::new();
    for (name, kind) in [("p384", "ec:P-384"), ("ed", "ed25519")] {
        let csr = ssl.new_key_and_csr(name, kind);
        let token = token(&api, "checkout").await;
        let issued = certify_with_token(&api, "checkout", &csr, &token).await;
        ssl.save_issued(name, &issued);
        ssl.assert_verifies(
            &format!("{name}.bundle.pem"),
            &format!("{name}.chain.pem"),
            &format!("{name}.pem"),
        );
        assert_eq!(
            ssl.run(&["x509", "-in", &format!("{name}.pem"), "-noout", "-pubkey"]),
            ssl.run(&["pkey", "-in", &format!("{name}.key"), "-pubout"]),
            "{kind}"
        );
    }

    let token = token(&api, "checkout").await;
    for (name, kind, named) in [
        ("rsa", "rsa", "the CSR's key is an RSA key"),
        (
            "k1",
            "ec:secp256k1",
            "the CSR's key is an elliptic-curve key on a curve other than P-256 and P-384",
        ),
    ] {
        let csr = ssl.new_key_and_csr(name, kind);
        let reply = certify(
            &api,
            &json!({"service": "checkout", "csr": csr, "join_token": token}),
        )
        .await;
        let message = reply.error(400, "invalid_argument");
        assert!(
            message.contains(named)
                && message.contains("use an ECDSA P-256 (recommended), P-384 or Ed25519 key"),
            "{kind}: {message}"
        );
    }
    // Refused CSRs do not spend the token.
    let csr = ssl.new_key_and_csr("good", "ec:P-256");
    certify_with_token(&api, "checkout", &csr, &token).await;
}

// ---------------------------------------------------------------------------------------
// Refusals

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_say_why() {
    let control = TestControl::start_without_dns().await;
    let api = control.api();
    let ssl = Openssl::new();
    let csr = ssl.new_key_and_csr("leaf", "ec:P-256");
    let token = token(&api, "checkout").await;
    let body =
        |service: &str, token: &str| json!({"service": service, "csr": csr, "join_token": token});

    // A token for another service: refused, and not spent.
    let reply = certify(&api, &body("payments", &token)).await;
    let message = reply.error(403, "permission_denied");
    assert!(
        message.contains("the join token is for service checkout, not payments")
            && message.contains("malla token create --service payments"),
        "{message}"
    );

    // An unknown token.
    let unknown = format!("malla_join_{}", "0".repeat(64));
    for bad in [unknown.as_str(), "", "not-a-token"] {
        let reply = certify(&api, &body("checkout", bad)).await;
        let message = reply.error(403, "permission_denied");
        assert!(
            message.contains("the join token is unknown or expired")
                && message.contains("malla token create --service"),
            "{bad:?}: {message}"
        );
    }

    // No credential; both credentials.
    let reply = certify(&api, &json!({"service": "checkout", "csr": csr})).await;
    let message = reply.error(401, "unauthenticated");
    assert!(
        message.contains("no credential") && message.contains("join_token"),
        "{message}"
    );
    let reply = certify(
        &api,
        &json!({"service": "checkout", "csr": csr, "join_token": token, "certificate": csr}),
    )
    .await;
    let message = reply.error(400, "invalid_argument");
    assert!(message.contains("not both"), "{message}");

    // Garbage CSRs: not PEM, PEM of garbage, a CSR whose signature does not verify. None
    // costs the token.
    let reply = certify(&api, &with_token_csr("this is not a CSR", &token)).await;
    let message = reply.error(400, "invalid_argument");
    assert!(
        message.contains("csr: expected one PEM block '-----BEGIN CERTIFICATE REQUEST-----'"),
        "{message}"
    );
    let garbage = "-----BEGIN CERTIFICATE REQUEST-----\nZ2FyYmFnZSBnYXJiYWdl\n-----END CERTIFICATE REQUEST-----\n";
    let reply = certify(&api, &with_token_csr(garbage, &token)).await;
    let message = reply.error(400, "invalid_argument");
    assert!(
        message.contains("the CSR is not a PKCS#10 request in DER"),
        "{message}"
    );
    // Tamper with the signed subject (whatever -> whatevex): the signature breaks.
    ssl.run(&[
        "req",
        "-in",
        "leaf.csr",
        "-outform",
        "DER",
        "-out",
        "leaf.csr.der",
    ]);
    let mut der = std::fs::read(ssl.path("leaf.csr.der")).unwrap();
    let at = der
        .windows(8)
        .position(|w| w == b"whatever")
        .expect("the subject in the CSR");
    der[at + 7] = b'x';
    let tampered = ssl.der_to_pem("req", "tampered", &der);
    let reply = certify(&api, &with_token_csr(&tampered, &token)).await;
    let message = reply.error(400, "invalid_argument");
    assert!(
        message.contains("the CSR's signature does not verify"),
        "{message}"
    );
    // Two CSRs.
    let reply = certify(&api, &with_token_csr(&format!("{csr}{csr}"), &token)).await;
    let message = reply.error(400, "invalid_argument");
    assert!(message.contains("found 2"), "{message}");

    // Bad service names are refused with a suggestion, before anything is looked at.
    let reply = certify(&api, &body("Checkout Service", &token)).await;
    let message = reply.error(400, "invalid_argument");
    assert!(message.contains("try \"checkout-service\""), "{message}");
    let reply = certify(
        &api,
        &json!({"service": "checkout", "csr": csr, "join_token": token, "spiffe_id": "x"}),
    )
    .await;
    reply.error(400, "invalid_argument");

    // After all that, the token still works, once.
    let issued = certify(&api, &body("checkout", &token)).await.ok();
    assert_eq!(issued["spiffe_id"], CHECKOUT_ID);
    let reply = certify(&api, &body("checkout", &token)).await;
    let message = reply.error(403, "permission_denied");
    assert!(
        message.contains("the join token was already used (at ")
            && message.contains("create a new one"),
        "{message}"
    );
    // For another service, a used token is still "used", not a hint that it exists
    // for some other service... either way it is refused.
    let reply = certify(&api, &body("payments", &token)).await;
    reply.error(403, "permission_denied");

    // Creating tokens: the TTL's range, its syntax, the service name.
    for (body, says) in [
        (
            json!({"service": "checkout", "ttl": "5s"}),
            "ttl must be from 10s to 2592000s (30 days)",
        ),
        (
            json!({"service": "checkout", "ttl": "31d"}),
            "ttl must be from 10s to 2592000s (30 days)",
        ),
        (
            json!({"service": "checkout", "ttl": "soon"}),
            "ttl \"soon\"",
        ),
        (
            json!({"service": "Cotización de Envío"}),
            "try \"cotizacion-de-envio\"",
        ),
        (json!({"ttl": "1h"}), "service"),
        (json!({"service": "checkout", "uses": 2}), "uses"),
    ] {
        let reply = post(&api, "/v1/tokens", &body).await;
        let message = reply.error(400, "invalid_argument");
        assert!(message.contains(says), "{body}: {message}");
    }
    // Only the route's methods.
    assert_eq!(api.get("/v1/tokens").await.status, 405);
    assert_eq!(api.get("/v1/certificates").await.status, 405);

    fn with_token_csr(csr: &str, token: &str) -> Value {
        json!({"service": "checkout", "csr": csr, "join_token": token})
    }
}

/// Only a digest of a token is kept, under a lease of its TTL: when it runs out the record
/// leaves the store and the token is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_refused() {
    let control = TestControl::start_without_dns().await;
    let api = control.api();
    let ssl = Openssl::new();
    let csr = ssl.new_key_and_csr("leaf", "ec:P-256");

    let created = create_token(&api, "checkout", Some("10s")).await;
    assert_eq!(created["ttl_seconds"], 10);
    let token = created["token"].as_str().unwrap().to_string();
    let secret = token.strip_prefix("malla_join_").unwrap();
    let records = token_records(&control).await;
    assert_eq!(records.len(), 1, "{records:?}");
    let (key, value) = &records[0];
    assert!(
        !key.contains(secret) && !value.contains(secret),
        "the secret is stored: {key} {value}"
    );
    assert!(value.contains("\"service\":\"checkout\""), "{value}");

    // The lease removes it after 10 s (polled: about 11 s here).
    assert_eventually!(
        tries: 1500,
        token_records(&control).await.is_empty(),
        "the token's record outlived its TTL"
    );
    let reply = certify(
        &api,
        &json!({"service": "checkout", "csr": csr, "join_token": token}),
    )
    .await;
    let message = reply.error(403, "permission_denied");
    assert!(
        message.contains("the join token is unknown or expired"),
        "{message}"
    );
}

/// Of several sidecars racing with one token, one gets the certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_raced_for_is_used_once() {
    let control = TestControl::start_without_dns().await;
    let api = control.api();
    let ssl = Openssl::new();
    let csr = ssl.new_key_and_csr("leaf", "ec:P-256");
    let token = token(&api, "checkout").await;
    let body = json!({"service": "checkout", "csr": csr, "join_token": token});
    let racers: Vec<_> = (0..8)
        .map(|_| {
            let (api, body) = (api.clone(), body.clone());
            tokio::spawn(async move { certify(&api, &body).await })
        })
        .collect();
    let mut issued = 0;
    for racer in racers {
        let reply = racer.await.unwrap();
        match reply.status {
            200 => issued += 1,
            403 => assert!(reply.message().contains("already used"), "{reply}"),
            409 => assert!(reply.message().contains("concurrently"), "{reply}"),
            _ => panic!("unexpected answer: {reply}"),
        }
    }
    assert_eq!(issued, 1, "one token, one certificate");
}

// ---------------------------------------------------------------------------------------
// gRPC

fn rcgen_csr(key: &rcgen::KeyPair) -> Vec<u8> {
    rcgen::CertificateParams::new(vec!["evil.example".to_string()])
        .unwrap()
        .serialize_request(key)
        .unwrap()
        .der()
        .to_vec()
}

fn with_token(service: &str, csr: &[u8], token: &str) -> pb::CertifyRequest {
    pb::CertifyRequest {
        service: service.into(),
        csr: csr.to_vec(),
        credential: Some(pb::certify_request::Credential::JoinToken(token.into())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_certify_with_an_rcgen_csr() {
    let control = TestControl::start_without_dns().await;
    let api = control.api();
    let ssl = Openssl::new();
    let mut client = IdentityClient::new(control.grpc_channel().await);

    let key = rcgen::KeyPair::generate().unwrap(); // P-256
    let csr = rcgen_csr(&key);
    let token = token(&api, "checkout").await;
    let before = unix_ms_now();
    let issued = client
        .certify(with_token("checkout", &csr, &token))
        .await
        .expect("certify")
        .into_inner();
    let after = unix_ms_now();
    assert_eq!(issued.spiffe_id, CHECKOUT_ID);
    assert_eq!(issued.certificate_chain.len(), 1);
    assert_eq!(issued.trust_bundle.len(), 1);
    // Valid from a minute before it was issued (clock skew) to 24 h after.
    let (minute, day) = (60_000, 24 * 3600 * 1000);
    assert!(
        (before - minute - 1000..=after - minute + 1000).contains(&issued.not_before_unix_ms),
        "{issued:?}"
    );
    assert!(
        (before + day - 1000..=after + day + 1000).contains(&issued.not_after_unix_ms),
        "{issued:?}"
    );
    ssl.der_to_pem("x509", "leaf", &issued.certificate_chain[0]);
    let bundle = ssl.der_to_pem("x509", "bundle", &issued.trust_bundle[0]);
    assert_eq!(
        unix(&bundle),
        unix(
            api.get("/v1/identity").await.ok()["trust_bundle_pem"]
                .as_str()
                .unwrap()
        )
    );
    ssl.assert_verifies("bundle.pem", "leaf.pem", "leaf.pem");
    let san = ssl.run(&[
        "x509",
        "-in",
        "leaf.pem",
        "-noout",
        "-ext",
        "subjectAltName",
    ]);
    assert!(
        san.contains("critical") && san.contains(&format!("URI:{CHECKOUT_ID}")),
        "{san}"
    );
    assert!(!san.contains("evil.example"), "{san}");

    // The token again.
    let status = client
        .certify(with_token("checkout", &csr, &token))
        .await
        .expect_err("a used token");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("already used") && status.message().contains("create a new one"),
        "{status:?}"
    );
    // For another service; unknown.
    let other = self::token(&api, "checkout").await;
    let status = client
        .certify(with_token("payments", &csr, &other))
        .await
        .expect_err("another service's token");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("not payments"), "{status:?}");
    let status = client
        .certify(with_token("checkout", &csr, "malla_join_nope"))
        .await
        .expect_err("an unknown token");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("unknown or expired"),
        "{status:?}"
    );
    // No credential; a malformed CSR; a bad service name.
    let status = client
        .certify(pb::CertifyRequest {
            service: "checkout".into(),
            csr: csr.clone(),
            credential: None,
        })
        .await
        .expect_err("no credential");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let status = client
        .certify(with_token("checkout", b"garbage", &other))
        .await
        .expect_err("a malformed CSR");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("PKCS#10"), "{status:?}");
    let status = client
        .certify(with_token("Check Out", &csr, &other))
        .await
        .expect_err("a bad service name");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("try \"check-out\""), "{status:?}");

    // Renewal, on the second port: the certificate and a CSR of the same key.
    let mut second = IdentityClient::new(control.grpc_channel_to(control.grpc_addr()).await);
    let renewed = second
        .certify(pb::CertifyRequest {
            service: "checkout".into(),
            csr: rcgen_csr(&key),
            credential: Some(pb::certify_request::Credential::Certificate(
                issued.certificate_chain[0].clone(),
            )),
        })
        .await
        .expect("renew")
        .into_inner();
    assert_eq!(renewed.spiffe_id, CHECKOUT_ID);
    ssl.der_to_pem("x509", "renewed", &renewed.certificate_chain[0]);
    ssl.assert_verifies("bundle.pem", "renewed.pem", "renewed.pem");
    // With another key's CSR.
    let stranger = rcgen::KeyPair::generate().unwrap();
    let status = second
        .certify(pb::CertifyRequest {
            service: "checkout".into(),
            csr: rcgen_csr(&stranger),
            credential: Some(pb::certify_request::Credential::Certificate(
                issued.certificate_chain[0].clone(),
            )),
        })
        .await
        .expect_err("another key");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // An Ed25519 key from rcgen.
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let issued = client
        .certify(with_token("checkout", &rcgen_csr(&ed), &other))
        .await
        .expect("an Ed25519 key")
        .into_inner();
    ssl.der_to_pem("x509", "ed", &issued.certificate_chain[0]);
    ssl.assert_verifies("bundle.pem", "ed.pem", "ed.pem");
}

// ---------------------------------------------------------------------------------------
// Restarts and files

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_survives_a_restart() {
    let mut control = TestControl::start_without_dns().await;
    let api = control.api();
    let ssl = Openssl::new();

    let ca_dir = control.data_dir().join("ca");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&ca_dir.join("root.key")), 0o600, "root.key");
        assert_eq!(mode(&ca_dir), 0o700, "the ca directory");
    }
    // The files are what openssl reads: a P-256 CA certificate and its key.
    let root_crt = ca_dir.join("root.crt");
    let root_key = ca_dir.join("root.key");
    let root_crt = root_crt.to_str().unwrap();
    let root_key = root_key.to_str().unwrap();
    let text = ssl.run(&["x509", "-in", root_crt, "-noout", "-text"]);
    assert!(
        text.contains("CA:TRUE") && text.contains("Certificate Sign") && text.contains("P-256"),
        "{text}"
    );
    assert_eq!(
        ssl.run(&["x509", "-in", root_crt, "-noout", "-pubkey"]),
        ssl.run(&["pkey", "-in", root_key, "-pubout"])
    );

    let bundle = api.get("/v1/identity").await.ok()["trust_bundle_pem"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        unix(&bundle),
        unix(&std::fs::read_to_string(root_crt).unwrap())
    );
    let csr = ssl.new_key_and_csr("leaf", "ec:P-256");
    let used = token(&api, "checkout").await;
    let issued = certify_with_token(&api, "checkout", &csr, &used).await;
    ssl.save_issued("before", &issued);
    let unused = token(&api, "checkout").await;

    control.restart().await;
    let api = control.api();

    let after = api.get("/v1/identity").await.ok();
    assert_eq!(after["trust_bundle_pem"], bundle.as_str(), "the same root");
    // A certificate issued before renews after.
    let renewed = certify(
        &api,
        &json!({"service": "checkout", "csr": ssl.csr_for_key("leaf", "renew"),
                "certificate": ssl.read("before.pem")}),
    )
    .await
    .ok();
    ssl.save_issued("after", &renewed);
    ssl.assert_verifies("before.bundle.pem", "after.chain.pem", "after.pem");
    // Tokens are in the store: the used one stays used, the other still works.
    let reply = certify(
        &api,
        &json!({"service": "checkout", "csr": csr, "join_token": used}),
    )
    .await;
    assert!(reply
        .error(403, "permission_denied")
        .contains("already used"));
    certify_with_token(&api, "checkout", &csr, &unused).await;
}

/// A data directory holding one of the root's two files: the control plane does not start
/// (rather than creating a new root that no workload trusts) and says what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_a_root_refuses_to_start() {
    let mut control = TestControl::start_without_dns().await;
    control.stop().await;
    let ca_dir = control.data_dir().join("ca");
    std::fs::remove_file(ca_dir.join("root.key")).unwrap();
    let e = start_err(control.data_dir(), IdentitySettings::default()).await;
    assert!(
        e.contains("certificate authority")
            && e.contains("root.key")
            && e.contains("without the other"),
        "{e}"
    );
    assert!(ca_dir.join("root.crt").exists(), "the root was kept");
}

// ---------------------------------------------------------------------------------------
// An operator's CA

/// A control plane over `dir` with these identity settings (APIs on ephemeral ports).
async fn start(dir: &Path, identity: IdentitySettings) -> anyhow::Result<Control> {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    Control::start_with(
        ControlConfig {
            data_dir: dir.to_path_buf(),
            http_addr: any,
            grpc_addr: any,
            dns_addr: None,
            dns: DnsSettings::default(),
            identity,
            tls_names: Vec::new(),
        },
        ServeSettings::default(),
    )
    .await
}

/// The error of a start that must fail, with its causes.
async fn start_err(dir: &Path, identity: IdentitySettings) -> String {
    match start(dir, identity).await {
        Ok(control) => {
            control.stop().await;
            panic!("the control plane started");
        }
        Err(e) => format!("{e:#}"),
    }
}

/// openssl makes a root and an intermediate (`root.crt`, `int.crt`, `int.key`) and
/// `ca.pem`: the intermediate, then the root.
fn operator_ca(ssl: &Openssl) {
    ssl.write(
        "ca.ext",
        "basicConstraints=critical,CA:TRUE,pathlen:0\n\
         keyUsage=critical,keyCertSign,cRLSign\n\
         subjectKeyIdentifier=hash\n\
         authorityKeyIdentifier=keyid\n",
    );
    ssl.run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "root.key",
        "-out",
        "root.crt",
        "-subj",
        "/O=Example/CN=Example Root",
        "-days",
        "365",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    ssl.run(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "int.key",
        "-out",
        "int.csr",
        "-subj",
        "/O=Example/CN=Example Mesh Intermediate",
    ]);
    ssl.run(&[
        "x509", "-req", "-in", "int.csr", "-CA", "root.crt", "-CAkey", "root.key", "-days", "30",
        "-extfile", "ca.ext", "-out", "int.crt",
    ]);
    ssl.write(
        "ca.pem",
        format!("{}{}", ssl.read("int.crt"), ssl.read("root.crt")),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_intermediate_issues_chains_that_verify_to_its_root() {
    let ssl = Openssl::new();
    operator_ca(&ssl);
    let data = TempDir::new("control");
    let control = start(
        data.path(),
        IdentitySettings {
            trust_domain: TrustDomain::new("prod.example.com").unwrap(),
            cert_ttl: Duration::from_secs(3600),
            ca_files: Some((ssl.path("ca.pem"), ssl.path("int.key"))),
            mtls_mode: Default::default(),
        },
    )
    .await
    .expect("start with the operator's CA");
    assert!(
        !data.path().join("ca").exists(),
        "no root is created when the operator gives one"
    );
    let api = Api::new(control.http_addr).with_credentials_of(data.path());

    let identity = api.get("/v1/identity").await.ok();
    assert_eq!(identity["trust_domain"], "prod.example.com");
    assert_eq!(identity["cert_ttl_seconds"], 3600);
    assert_eq!(
        unix(identity["trust_bundle_pem"].as_str().unwrap()),
        unix(&ssl.read("root.crt")),
        "the bundle is the root alone"
    );

    let created = create_token(&api, "checkout", None).await;
    assert_eq!(
        created["spiffe_id"],
        "spiffe://prod.example.com/svc/checkout"
    );
    assert_eq!(created["ttl_seconds"], 3600);
    let csr = ssl.new_key_and_csr("leaf", "ec:P-256");
    let issued =
        certify_with_token(&api, "checkout", &csr, created["token"].as_str().unwrap()).await;
    assert_eq!(
        issued["spiffe_id"],
        "spiffe://prod.example.com/svc/checkout"
    );
    let chain = certs(issued["certificate_chain_pem"].as_str().unwrap());
    assert_eq!(chain.len(), 2, "the leaf and the intermediate");
    assert_eq!(unix(&chain[1]), unix(&ssl.read("int.crt")));
    ssl.save_issued("leaf", &issued);
    ssl.assert_verifies("root.crt", "leaf.chain.pem", "leaf.pem");
    // The chain as it came renews: its first certificate is the leaf.
    let renew_csr = ssl.csr_for_key("leaf", "leaf-renew");
    let renewed = certify(
        &api,
        &json!({"service": "checkout", "csr": renew_csr,
                "certificate": issued["certificate_chain_pem"]}),
    )
    .await
    .ok();
    assert_eq!(renewed["spiffe_id"], issued["spiffe_id"]);
    // Without the intermediate it does not verify: the chain is needed, and sent.
    let (ok, text) = ssl.verify("root.crt", "leaf.pem", "leaf.pem", "sslclient");
    assert!(!ok, "verified without the intermediate: {text}");
    // 1 h.
    ssl.run(&["x509", "-in", "leaf.pem", "-noout", "-checkend", "3500"]);
    assert!(!ssl
        .output(&["x509", "-in", "leaf.pem", "-noout", "-checkend", "3720"])
        .status
        .success());

    // Renewal of certificates the intermediate signed (with rcgen, as the CA's key holder
    // could): expired, of another trust domain, with two URIs are refused; a valid one is
    // renewed (the CA trusts what its key signed).
    let int_key = rcgen::KeyPair::from_pem(&ssl.read("int.key")).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ssl.read("int.crt"), int_key).unwrap();
    let holder = rcgen::KeyPair::generate().unwrap();
    let sign = |uris: &[&str], not_before: SystemTime, not_after: SystemTime| {
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|u| rcgen::SanType::URI((*u).try_into().unwrap()))
            .collect();
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.signed_by(&holder, &issuer).unwrap().pem()
    };
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let renew_csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&holder)
        .unwrap()
        .pem()
        .unwrap();
    let renew = |certificate: String| {
        let body = json!({"service": "checkout", "csr": renew_csr, "certificate": certificate});
        let api = api.clone();
        async move { certify(&api, &body).await }
    };
    let id = "spiffe://prod.example.com/svc/checkout";
    for (certificate, says) in [
        (sign(&[id], now - 2 * hour, now - hour), "expired"),
        (
            sign(
                &["spiffe://malla.local/svc/checkout"],
                now - hour,
                now + hour,
            ),
            "is not in the trust domain prod.example.com",
        ),
        (
            sign(
                &[id, "spiffe://prod.example.com/svc/admin"],
                now - hour,
                now + hour,
            ),
            "more than one URI SAN",
        ),
        (sign(&[], now - hour, now + hour), "no SPIFFE ID"),
    ] {
        let reply = renew(certificate).await;
        let message = reply.error(403, "permission_denied");
        assert!(message.contains(says), "{says}: {message}");
    }
    let renewed = renew(sign(&[id], now - hour, now + hour)).await.ok();
    assert_eq!(renewed["spiffe_id"], id);

    control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_ca_that_does_not_fit_refuses_to_start() {
    let ssl = Openssl::new();
    operator_ca(&ssl);
    ssl.write(
        "reversed.pem",
        format!("{}{}", ssl.read("root.crt"), ssl.read("int.crt")),
    );
    let data = TempDir::new("control");
    for (cert, key, says) in [
        (
            "ca.pem",
            "root.key",
            "the key file does not hold this certificate's key",
        ),
        (
            "reversed.pem",
            "int.key",
            "the last certificate is not a self-signed root",
        ),
        (
            "int.crt",
            "int.key",
            "the last certificate is not a self-signed root",
        ),
        ("int.key", "int.key", "holds no PEM certificate"),
        ("ca.pem", "int.crt", "not a private key"),
        ("ca.pem", "missing.key", "cannot read"),
    ] {
        let e = start_err(
            data.path(),
            IdentitySettings {
                ca_files: Some((ssl.path(cert), ssl.path(key))),
                ..IdentitySettings::default()
            },
        )
        .await;
        assert!(e.contains(says), "{cert} {key}: {e}");
    }
}

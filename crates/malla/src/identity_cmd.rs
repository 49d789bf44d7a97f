//! `malla token create --service NAME`: a join token with which one sidecar of the service
//! gets its identity; `malla identity`: the mesh's trust domain, trust bundle, roots and
//! root rotation; `malla identity rotate`: starts rotating the root.

use http::Method;
use serde_json::{json, Value};

use crate::{
    client::Client,
    output::{outln, print_table, rows, text},
    registry_cmd::{Common, Output},
};

#[derive(clap::Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    what: TokenWhat,
}

#[derive(clap::Subcommand)]
enum TokenWhat {
    /// Create a join token: one sidecar of SERVICE uses it once to get the service's
    /// certificate (spiffe://DOMAIN/svc/SERVICE), then renews it by itself.
    #[command(after_help = "Examples:\n  \
        malla token create --service checkout\n  \
        malla token create --service checkout --ttl 10m -o json\n\n\
        The token is shown once; the control plane keeps only a digest of it. Hand it to the\n\
        sidecar with MALLA_JOIN_TOKEN, --join-token-file or [control] join_token_file\n\
        (see docs/identity.md).")]
    Create {
        /// The service whose identity the token grants.
        #[arg(long, value_name = "NAME")]
        service: String,
        /// How long the token may be used, e.g. 10m, 1h, 7d (10s to 30d).
        #[arg(long, value_name = "DURATION", default_value = "1h")]
        ttl: String,
        #[command(flatten)]
        common: Common,
    },
}

pub fn token(args: TokenArgs) -> anyhow::Result<()> {
    let TokenWhat::Create {
        service,
        ttl,
        common,
    } = args.what;
    let client = Client::new(&common.control)?;
    let v = client.call(
        Method::POST,
        "/v1/tokens",
        Some(&json!({"service": service, "ttl": ttl})),
    )?;
    match common.output {
        Output::Json => crate::output::print_json(&v)?,
        Output::Yaml => crate::yaml::print(&v)?,
        // The token alone on stdout, so that `TOKEN=$(malla token create ...)` works; what
        // it grants on stderr.
        Output::Table | Output::Wide => {
            outln!("{}", crate::output::text(&v["token"]))?;
            crate::output::errln!(
                "join token for {} (identity {}), valid until {}; shown once",
                crate::output::text(&v["service"]),
                crate::output::text(&v["spiffe_id"]),
                crate::output::text(&v["expires_at"])
            );
        }
    }
    Ok(())
}

#[derive(clap::Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  \
    malla identity\n  \
    malla identity --bundle > bundle.pem && openssl verify -CAfile bundle.pem cert.pem\n  \
    malla identity rotate"
)]
pub struct IdentityArgs {
    #[command(subcommand)]
    what: Option<IdentityWhat>,
    /// Print only the trust bundle (PEM), for files and tools: openssl's -CAfile, the
    /// CLI's --ca-file and a sidecar's --control-ca on other machines.
    #[arg(long)]
    bundle: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(clap::Subcommand)]
enum IdentityWhat {
    /// Rotate the root the control plane made: a new root joins the trust bundle now,
    /// signs one OVERLAP later, and the old root leaves the bundle one more OVERLAP later.
    #[command(after_help = "Examples:\n  \
        malla identity rotate\n  \
        malla identity rotate --overlap 30h\n\n\
        Sidecars learn the new root as they renew, before any certificate of it exists, so\n\
        no connection fails. Follow it with `malla identity`. A CA given with --ca-cert is\n\
        not rotated by malla (see docs/identity.md, Rotating the root).")]
    Rotate {
        /// How long each of the two phases lasts, e.g. 26h, 90m; at least the certificate
        /// TTL. Default: the TTL and 10 % (at least a minute) more.
        #[arg(long, value_name = "DURATION")]
        overlap: Option<String>,
        #[command(flatten)]
        common: Common,
    },
}

pub fn identity(args: IdentityArgs) -> anyhow::Result<()> {
    if let Some(IdentityWhat::Rotate { overlap, common }) = args.what {
        return rotate(overlap, common);
    }
    let client = Client::new(&args.common.control)?;
    let v = client.get("/v1/identity")?;
    if args.bundle {
        crate::output::write_out(format_args!(
            "{}",
            crate::output::text(&v["trust_bundle_pem"])
        ))?;
        return Ok(());
    }
    match args.common.output {
        Output::Json => crate::output::print_json(&v)?,
        Output::Yaml => crate::yaml::print(&v)?,
        output @ (Output::Table | Output::Wide) => {
            outln!(
                "Trust domain:      {}",
                crate::output::text(&v["trust_domain"])
            )?;
            outln!(
                "Identities:        spiffe://{}/svc/SERVICE",
                crate::output::text(&v["trust_domain"])
            )?;
            outln!(
                "Certificate TTL:   {}",
                hours(v["cert_ttl_seconds"].as_u64().unwrap_or(0))
            )?;
            outln!(
                "mTLS mode:         {}",
                match v["mtls_mode"].as_str() {
                    Some("strict") =>
                        "strict (the mesh's: sidecars refuse plaintext callers; a service's policy may set its own)",
                    Some("permissive") =>
                        "permissive (the mesh's: sidecars take plaintext callers too; a service's policy may set its own)",
                    Some(other) => other,
                    None => "permissive (a control plane of an earlier version)",
                }
            )?;
            outln!(
                "CA:                {}",
                match v["ca"].as_str() {
                    Some("operator") => "the operator's (--ca-cert); not rotated by malla",
                    _ => "made by malla (DATA_DIR/ca); malla identity rotate rotates its root",
                }
            )?;
            outln!("Rotation:          {}", rotation_line(&v["rotation"]))?;
            outln!("Trust bundle:      (malla identity --bundle)")?;
            outln!()?;
            let wide = output == Output::Wide;
            print_table(
                &["ROLE", "SHA-256", "NOT AFTER", "SUBJECT"],
                rows(&v["roots"], |root| {
                    let sha = text(&root["sha256"]);
                    vec![
                        text(&root["role"]),
                        if wide { sha } else { short(&sha) },
                        text(&root["not_after"]),
                        text(&root["subject"]),
                    ]
                }),
            )?;
        }
    }
    Ok(())
}

/// The rotation under way, in one line.
fn rotation_line(rotation: &Value) -> String {
    let at = |field: &str| text(&rotation[field]);
    match rotation["phase"].as_str() {
        None => "none".to_string(),
        Some("announcing") => format!(
            "announcing: both roots trusted, the old one signs until {}; the old root leaves the bundle at {}",
            at("switch_at"),
            at("ends_at")
        ),
        Some("retiring") => format!(
            "retiring: the new root signs; the old one stays trusted until {}",
            at("ends_at")
        ),
        Some(other) => other.to_string(),
    }
}

/// The first eight bytes of a fingerprint, as people compare them.
fn short(sha256: &str) -> String {
    match sha256.get(..23) {
        Some(head) if sha256.len() > 23 => format!("{head}…"),
        _ => sha256.to_string(),
    }
}

fn rotate(overlap: Option<String>, common: Common) -> anyhow::Result<()> {
    let client = Client::new(&common.control)?;
    let body = match &overlap {
        Some(overlap) => json!({ "overlap": overlap }),
        None => json!({}),
    };
    let v = client.call(Method::POST, "/v1/identity/rotate", Some(&body))?;
    match common.output {
        Output::Json => crate::output::print_json(&v)?,
        Output::Yaml => crate::yaml::print(&v)?,
        Output::Table | Output::Wide => {
            let rotation = &v["rotation"];
            let new = v["roots"]
                .as_array()
                .and_then(|roots| roots.iter().find(|r| r["role"] == "next"))
                .map_or_else(|| "-".to_string(), |r| short(&text(&r["sha256"])));
            outln!("root rotation started: the new root {new} is in the trust bundle from now on")?;
            print_table(
                &["WHEN", "WHAT"],
                vec![
                    vec![
                        text(&rotation["started_at"]),
                        "both roots trusted; the old one signs while sidecars renew and learn the new one".into(),
                    ],
                    vec![text(&rotation["switch_at"]), "the new root signs".into()],
                    vec![
                        text(&rotation["ends_at"]),
                        "the old root leaves the trust bundle".into(),
                    ],
                ],
            )?;
            crate::output::errln!("follow it with: malla identity");
        }
    }
    Ok(())
}

/// `86400` -> `24h`, `5400` -> `90m`, `61` -> `61s`: as `--cert-ttl` takes it.
fn hours(secs: u64) -> String {
    match secs {
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

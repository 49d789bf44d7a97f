//! `malla token create --service NAME`: a join token with which one sidecar of the service
//! gets its identity; `malla identity`: the mesh's trust domain and trust bundle.

use http::Method;
use serde_json::json;

use crate::{
    client::Client,
    output::outln,
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
#[command(after_help = "Examples:\n  \
    malla identity\n  \
    malla identity --bundle > bundle.pem && openssl verify -CAfile bundle.pem cert.pem")]
pub struct IdentityArgs {
    /// Print only the trust bundle (PEM), for files and tools.
    #[arg(long)]
    bundle: bool,
    #[command(flatten)]
    common: Common,
}

pub fn identity(args: IdentityArgs) -> anyhow::Result<()> {
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
        Output::Table | Output::Wide => {
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
            outln!("Trust bundle:      (malla identity --bundle)")?;
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

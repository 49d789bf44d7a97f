//! The identity kept on disk between runs: `key.pem` (PKCS#8, 0600), `chain.pem` (the
//! leaf first) and `bundle.pem` in `[control] identity_dir`. Each file is written to a
//! temporary name and renamed, so a crash leaves the previous version whole.

use std::{
    fs,
    io::Write as _,
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::KeyPair;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::Svid;

const KEY: &str = "key.pem";
const CHAIN: &str = "chain.pem";
const BUNDLE: &str = "bundle.pem";

/// Where `dir` keeps the trust bundle of its certificate.
pub(crate) fn kept_bundle(dir: &Path) -> std::path::PathBuf {
    dir.join(BUNDLE)
}

/// The kept key and certificate, when there are some and the certificate is still valid;
/// `Ok(None)` when the directory holds none yet.
pub(super) fn load(dir: &Path) -> Result<Option<(KeyPair, Svid)>, String> {
    let key_path = dir.join(KEY);
    if !key_path.exists() {
        return Ok(None);
    }
    let read = |name: &str| {
        fs::read_to_string(dir.join(name)).map_err(|e| format!("{name}: cannot read: {e}"))
    };
    let key = KeyPair::from_pem(&read(KEY)?).map_err(|e| format!("{KEY}: {e}"))?;
    let chain = blocks(&read(CHAIN)?, CHAIN)?;
    let bundle = blocks(&read(BUNDLE)?, BUNDLE)?;
    let (_, leaf) = X509Certificate::from_der(&chain[0])
        .map_err(|e| format!("{CHAIN}: not a certificate ({e})"))?;
    if leaf.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
        return Err(format!("{CHAIN} is not for the key in {KEY}"));
    }
    let time = |t: x509_parser::time::ASN1Time| {
        UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
    };
    let (not_before, not_after) = (
        time(leaf.validity().not_before),
        time(leaf.validity().not_after),
    );
    if SystemTime::now() >= not_after {
        return Err(format!("{CHAIN} has expired"));
    }
    let spiffe_id = crate::tls::spiffe_id(&chain[0])
        .ok_or_else(|| format!("{CHAIN}: the certificate has no SPIFFE ID"))?;
    let key_pkcs8 = Arc::new(key.serialize_der());
    Ok(Some((
        key,
        Svid {
            spiffe_id,
            chain,
            key_pkcs8,
            trust_bundle: bundle,
            not_before,
            not_after,
        },
    )))
}

/// Keeps `key` (once: it does not change) and `svid`'s chain and bundle.
pub(super) fn save(dir: &Path, key: &KeyPair, svid: &Svid) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| format!("cannot create it: {e}"))?;
    let pem = |label: &str, ders: &[Vec<u8>]| -> String {
        ders.iter()
            .map(|der| {
                pem::encode_config(
                    &pem::Pem::new(label, der.clone()),
                    pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
                )
            })
            .collect()
    };
    write(dir, KEY, key.serialize_pem().as_bytes(), true)?;
    write(
        dir,
        CHAIN,
        pem("CERTIFICATE", &svid.chain).as_bytes(),
        false,
    )?;
    write(
        dir,
        BUNDLE,
        pem("CERTIFICATE", &svid.trust_bundle).as_bytes(),
        false,
    )
}

fn write(dir: &Path, name: &str, bytes: &[u8], private: bool) -> Result<(), String> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    let _ = fs::remove_file(&tmp);
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp).map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)?;
    fs::rename(&tmp, &path).map_err(err)
}

fn blocks(text: &str, name: &str) -> Result<Vec<Vec<u8>>, String> {
    let blocks: Vec<Vec<u8>> = pem::parse_many(text)
        .map_err(|e| format!("{name}: not PEM ({e})"))?
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(pem::Pem::into_contents)
        .collect();
    if blocks.is_empty() {
        return Err(format!("{name}: no certificate"));
    }
    Ok(blocks)
}

//! The CA's files, when it made its root itself: `DATA_DIR/ca`, mode 0700.
//!
//! ```text
//! root.crt, root.key   the root in force (PEM; the key PKCS#8, 0600)
//! next.crt, next.key   during a rotation: the new root
//! rotation.json        during a rotation: its plan (when it started, switches, ends);
//!                      its presence is what makes next.* part of the CA
//! retired/             the certificates of the roots rotated out (never their keys)
//! ```
//!
//! Every file is written to a temporary name, synced and renamed over the old one, so a
//! crash leaves either version whole, never half a file. Each step of a rotation that
//! changes several files has one commit point, and what a crash leaves before or after it
//! is recognised at the next start ([`open`]):
//!
//! - starting: `next.key`, `next.crt`, then `rotation.json` (the commit). `next.*` without
//!   `rotation.json` are the leftovers of a start that did not finish, and are removed.
//! - ending ([`finish`]): the old root's certificate to `retired/`, `next.*` copied over
//!   `root.*`, then `rotation.json` removed (the commit), then `next.*`. While
//!   `rotation.json` remains and its end has passed, `root.*` is never read (it may be half
//!   replaced) and the end is done again.

use std::{fs, io::Write as _, path::Path, time::SystemTime};

use malla_core::TrustDomain;
use rcgen::KeyPair;
use serde_json::json;

use super::{authority, pem, pem_blocks, rotation::Plan, CaError};

pub(super) const ROOT_CERT: &str = "root.crt";
pub(super) const ROOT_KEY: &str = "root.key";
pub(super) const NEXT_CERT: &str = "next.crt";
pub(super) const NEXT_KEY: &str = "next.key";
pub(super) const ROTATION: &str = "rotation.json";
pub(super) const RETIRED: &str = "retired";

/// A key and its certificate (a root the CA made: the root alone), as read.
pub(super) type Keyed = (KeyPair, Vec<Vec<u8>>);

/// What the directory holds.
pub(super) struct OnDisk {
    /// The root in force before the rotation under way, if any; the only root otherwise.
    pub current: Keyed,
    /// The rotation under way and its new root.
    pub rotation: Option<(Plan, Keyed)>,
}

/// Reads the CA's directory as of `now`, creating the first root when it is empty and
/// finishing a rotation whose end has passed (the control plane was down at that time).
pub(super) fn open(dir: &Path, domain: &TrustDomain, now: SystemTime) -> Result<OnDisk, CaError> {
    if dir.join(ROTATION).exists() {
        let plan = read_plan(dir)?;
        let next = read_pair(dir, NEXT_CERT, NEXT_KEY)?;
        if next.1.len() != 1 || authority::fingerprint(&next.1[0]) != plan.next_sha256 {
            return Err(CaError::File {
                path: dir.join(NEXT_CERT),
                why: format!(
                    "is not the new root {ROTATION} names ({}): restore it from a backup, or \
                     move {ROTATION}, {NEXT_CERT} and {NEXT_KEY} away to abandon the rotation",
                    plan.next_sha256
                ),
            });
        }
        if plan.is_over(now) {
            finish(dir, &plan)?;
            tracing::info!(dir = %dir.display(), "the root rotation ended while the control plane was stopped: the new root is the only one");
            return Ok(OnDisk {
                current: next,
                rotation: None,
            });
        }
        let current = read_pair(dir, ROOT_CERT, ROOT_KEY)?;
        return Ok(OnDisk {
            current,
            rotation: Some((plan, next)),
        });
    }
    for leftover in [NEXT_KEY, NEXT_CERT] {
        let path = dir.join(leftover);
        if path.exists() {
            tracing::info!(path = %path.display(), "removing what an unfinished root rotation left");
            remove(&path)?;
        }
    }
    Ok(OnDisk {
        current: load_or_create(dir, domain, now)?,
        rotation: None,
    })
}

/// Writes a rotation's new root and then its plan: from then on it is part of the CA.
pub(super) fn start(
    dir: &Path,
    plan: &Plan,
    key: &KeyPair,
    cert_der: &[u8],
) -> Result<(), CaError> {
    write_atomic(&dir.join(NEXT_KEY), key.serialize_pem().as_bytes(), true)?;
    write_atomic(
        &dir.join(NEXT_CERT),
        pem("CERTIFICATE", cert_der).as_bytes(),
        false,
    )?;
    let text = serde_json::to_string_pretty(&plan.to_json()).unwrap_or_default() + "\n";
    write_atomic(&dir.join(ROTATION), text.as_bytes(), false)
}

/// Ends a rotation on disk: the new root becomes `root.*`, the old one's certificate goes
/// to `retired/` and its key is gone. Safe to run again after a crash at any step.
pub(super) fn finish(dir: &Path, plan: &Plan) -> Result<(), CaError> {
    let read = |name: &str| {
        let path = dir.join(name);
        fs::read(&path).map_err(|e| CaError::File {
            path,
            why: format!("cannot read: {e}"),
        })
    };
    let (next_key, next_cert) = (read(NEXT_KEY)?, read(NEXT_CERT)?);
    let root_path = dir.join(ROOT_CERT);
    // Unless a finish that crashed has already replaced it.
    if let Ok(old) = fs::read(&root_path) {
        if old != next_cert {
            let retired = dir.join(RETIRED);
            fs::create_dir_all(&retired).map_err(|e| CaError::File {
                path: retired.clone(),
                why: format!("cannot create the directory: {e}"),
            })?;
            let name = format!(
                "root-{}.crt",
                humantime::format_rfc3339_seconds(plan.ends_at)
                    .to_string()
                    .replace(':', "-")
            );
            write_atomic(&retired.join(name), &old, false)?;
        }
    }
    write_atomic(&dir.join(ROOT_KEY), &next_key, true)?;
    write_atomic(&root_path, &next_cert, false)?;
    remove(&dir.join(ROTATION))?;
    remove(&dir.join(NEXT_KEY))?;
    remove(&dir.join(NEXT_CERT))?;
    Ok(())
}

fn read_plan(dir: &Path) -> Result<Plan, CaError> {
    let path = dir.join(ROTATION);
    let err = |why: String| CaError::File {
        path: path.clone(),
        why,
    };
    let text = fs::read(&path).map_err(|e| err(format!("cannot read: {e}")))?;
    let value: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| err(format!("not JSON: {e}")))?;
    Plan::from_json(&value).map_err(|why| {
        err(format!(
            "{why}: restore it from a backup, or move {ROTATION}, {NEXT_CERT} and {NEXT_KEY} \
             away to abandon the rotation"
        ))
    })
}

fn read_pair(dir: &Path, cert: &str, key: &str) -> Result<Keyed, CaError> {
    let (cert_path, key_path) = (dir.join(cert), dir.join(key));
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => Ok((read_key(&key_path)?, read_certs(&cert_path)?)),
        _ => Err(CaError::File {
            path: dir.to_path_buf(),
            why: format!(
                "holds one of {cert} and {key} without the other (or neither): restore the \
                 missing file from a backup"
            ),
        }),
    }
}

/// Reads the generated root, or creates it (the key first, 0600 from its creation).
fn load_or_create(dir: &Path, domain: &TrustDomain, now: SystemTime) -> Result<Keyed, CaError> {
    let (cert_path, key_path) = (dir.join(ROOT_CERT), dir.join(ROOT_KEY));
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => return Ok((read_key(&key_path)?, read_certs(&cert_path)?)),
        (false, false) => {}
        (true, false) | (false, true) => {
            return Err(CaError::File {
                path: dir.to_path_buf(),
                why: format!(
                    "holds one of {ROOT_CERT} and {ROOT_KEY} without the other: restore the \
                     missing file, or move both away to create a new root (every workload \
                     will need new certificates)"
                ),
            })
        }
    }
    create_dir_private(dir)?;
    let (key, cert) = authority::new_root(domain, None, now)?;
    // The key first: a crash between the two leaves a key and no certificate, which the
    // next start reports rather than silently replacing.
    write_atomic(&key_path, key.serialize_pem().as_bytes(), true)?;
    write_atomic(&cert_path, pem("CERTIFICATE", cert.der()).as_bytes(), false)?;
    tracing::info!(path = %cert_path.display(), "created the mesh's root CA");
    Ok((key, vec![cert.der().to_vec()]))
}

fn create_dir_private(dir: &Path) -> Result<(), CaError> {
    let err = |e: std::io::Error| CaError::File {
        path: dir.to_path_buf(),
        why: format!("cannot create the directory: {e}"),
    };
    fs::create_dir_all(dir).map_err(err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    Ok(())
}

/// Writes `bytes` to `path` whole or not at all: to a temporary name in the same
/// directory, synced, then renamed over `path`. A `private` file is created mode 0600
/// (never readable by others, not even for an instant).
fn write_atomic(path: &Path, bytes: &[u8], private: bool) -> Result<(), CaError> {
    let err = |e: std::io::Error| CaError::File {
        path: path.to_path_buf(),
        why: format!("cannot write: {e}"),
    };
    let name = path
        .file_name()
        .map_or_else(Default::default, |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    // A temporary file a crash left behind.
    let _ = fs::remove_file(&tmp);
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(&tmp).map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)?;
    drop(file);
    fs::rename(&tmp, path).map_err(err)?;
    sync_dir(path)
}

fn remove(path: &Path) -> Result<(), CaError> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CaError::File {
            path: path.to_path_buf(),
            why: format!("cannot remove: {e}"),
        }),
    }
}

/// Makes a rename or removal in `path`'s directory durable.
fn sync_dir(path: &Path) -> Result<(), CaError> {
    #[cfg(unix)]
    if let Some(dir) = path.parent() {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| CaError::File {
                path: dir.to_path_buf(),
                why: format!("cannot sync the directory: {e}"),
            })?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

pub(super) fn read_key(path: &Path) -> Result<KeyPair, CaError> {
    let err = |why: String| CaError::File {
        path: path.to_path_buf(),
        why,
    };
    let text = fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(path).map(|m| m.permissions().mode() & 0o777);
        if mode.is_ok_and(|m| m & 0o077 != 0) {
            tracing::warn!(path = %path.display(), "the CA key can be read by other users: chmod 600 it");
        }
    }
    KeyPair::from_pem(&text).map_err(|e| {
        err(format!(
            "not a private key in PEM (PKCS#8 'PRIVATE KEY', 'EC PRIVATE KEY'...): {e}"
        ))
    })
}

pub(super) fn read_certs(path: &Path) -> Result<Vec<Vec<u8>>, CaError> {
    let err = |why: String| CaError::File {
        path: path.to_path_buf(),
        why,
    };
    let text = fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let certs: Vec<Vec<u8>> = pem_blocks(&text, "CERTIFICATE").map_err(err)?;
    if certs.is_empty() {
        return Err(err(
            "holds no PEM certificate ('-----BEGIN CERTIFICATE-----')".into(),
        ));
    }
    Ok(certs)
}

/// `json!` of a time as the files and the API write it.
pub(super) fn time_json(t: SystemTime) -> serde_json::Value {
    json!(humantime::format_rfc3339_millis(t).to_string())
}

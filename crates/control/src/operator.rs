//! The operator token: the credential of the HTTP API's operator routes, which the CLI (and
//! later the dashboard) sends as `Authorization: Bearer TOKEN`.
//!
//! Why one random token in a file rather than users and passwords: the control plane has
//! one kind of operator today, and whoever can read its data directory already holds the
//! store and the CA's key. So the token is created at the first start, kept beside them in
//! `DATA_DIR/operator.token` (mode 0600), shown once, and whoever can read that file is the
//! operator; a CLI on the same machine reads it there and needs no step.
//!
//! The token is `malla_op_` and 64 hex digits (256 bits from the OS), so secret scanners
//! and people can tell one, as join tokens (`malla_join_`). Only its SHA-256 is kept in
//! memory, and a presented token is compared with it in constant time. The file is
//! written to a temporary name, made durable and renamed over the old one, so a crash
//! leaves the old token or the new one, never half of one.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::RwLock,
};

use anyhow::Context as _;

/// What every operator token starts with.
pub const TOKEN_PREFIX: &str = "malla_op_";

/// The token's file in the data directory.
pub const FILE_NAME: &str = "operator.token";

/// The operator token in force, and the file that keeps it.
pub struct OperatorToken {
    path: PathBuf,
    /// SHA-256 of the token in force.
    digest: RwLock<[u8; 32]>,
    /// Serialises rotations: each writes the file and then swaps the digest.
    rotating: std::sync::Mutex<()>,
}

/// An opened token: the token itself when this start created it (to be shown once).
pub struct Opened {
    pub token: OperatorToken,
    pub created: Option<String>,
}

impl OperatorToken {
    /// Reads the token kept at `path`, or creates one there (mode 0600) when the file does
    /// not exist.
    pub fn open(path: &Path) -> anyhow::Result<Opened> {
        match fs::read_to_string(path) {
            Ok(text) => {
                let token = text.trim();
                if token.is_empty() {
                    anyhow::bail!(
                        "the operator token file {} is empty; remove it and a new token is created at the next start",
                        path.display()
                    );
                }
                if let Ok(meta) = fs::metadata(path) {
                    if meta.permissions().mode() & 0o077 != 0 {
                        tracing::warn!(
                            path = %path.display(),
                            "the operator token file can be read by other users; make it mode 600 (chmod 600)"
                        );
                    }
                }
                Ok(Opened {
                    token: OperatorToken::new(path, token),
                    created: None,
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let token = generate()?;
                write_file(path, &token)?;
                Ok(Opened {
                    token: OperatorToken::new(path, &token),
                    created: Some(token),
                })
            }
            Err(e) => {
                Err(e).with_context(|| format!("cannot read the operator token {}", path.display()))
            }
        }
    }

    fn new(path: &Path, token: &str) -> OperatorToken {
        OperatorToken {
            path: path.to_path_buf(),
            digest: RwLock::new(digest(token)),
            rotating: std::sync::Mutex::new(()),
        }
    }

    /// Where the token is kept.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `presented` is the token in force (in constant time).
    pub fn check(&self, presented: &str) -> bool {
        let presented = digest(presented);
        let current = *self.digest.read().unwrap_or_else(|e| e.into_inner());
        aws_lc_rs::constant_time::verify_slices_are_equal(&presented, &current).is_ok()
    }

    /// Makes a new token, replaces the file with it and puts it in force: the old one is
    /// refused from now on. Blocking (it writes and syncs the file).
    pub fn rotate(&self) -> anyhow::Result<String> {
        let _one_at_a_time = self.rotating.lock().unwrap_or_else(|e| e.into_inner());
        let token = generate()?;
        write_file(&self.path, &token)?;
        *self.digest.write().unwrap_or_else(|e| e.into_inner()) = digest(&token);
        tracing::info!(path = %self.path.display(), "operator token rotated");
        Ok(token)
    }
}

fn digest(token: &str) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn generate() -> anyhow::Result<String> {
    let mut secret = [0u8; 32];
    aws_lc_rs::rand::fill(&mut secret)
        .map_err(|_| anyhow::anyhow!("no randomness from the OS for the operator token"))?;
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{TOKEN_PREFIX}{hex}"))
}

/// Writes `token` to `path` through a temporary file in the same directory (mode 0600
/// from its creation), synced, then renamed over `path`, and the directory synced.
fn write_file(path: &Path, token: &str) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(FILE_NAME);
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let written = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(format!("{token}\n").as_bytes())?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.with_context(|| format!("cannot write the operator token to {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    fn dir(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("malla-op-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        Dir(d)
    }

    #[test]
    fn created_once_mode_600_then_read_back() {
        let d = dir("create");
        let path = d.0.join(FILE_NAME);
        let first = OperatorToken::open(&path).unwrap();
        let token = first.created.clone().expect("created at the first open");
        assert!(token.starts_with(TOKEN_PREFIX) && token.len() == TOKEN_PREFIX.len() + 64);
        assert_eq!(fs::read_to_string(&path).unwrap().trim(), token);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(first.token.check(&token));
        assert!(!first.token.check("malla_op_00"));
        assert!(!first.token.check(""));

        let again = OperatorToken::open(&path).unwrap();
        assert!(again.created.is_none(), "not created (nor shown) again");
        assert!(again.token.check(&token));
    }

    #[test]
    fn rotation_replaces_the_file_and_refuses_the_old_token() {
        let d = dir("rotate");
        let path = d.0.join(FILE_NAME);
        let opened = OperatorToken::open(&path).unwrap();
        let old = opened.created.unwrap();
        let new = opened.token.rotate().unwrap();
        assert_ne!(old, new);
        assert!(!opened.token.check(&old));
        assert!(opened.token.check(&new));
        assert_eq!(fs::read_to_string(&path).unwrap().trim(), new);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let leftovers: Vec<_> = fs::read_dir(&d.0).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left: {leftovers:?}");
    }

    #[test]
    fn an_empty_file_is_refused_with_what_to_do() {
        let d = dir("empty");
        fs::create_dir_all(&d.0).unwrap();
        let path = d.0.join(FILE_NAME);
        fs::write(&path, "\n").unwrap();
        let err = OperatorToken::open(&path).err().unwrap().to_string();
        assert!(err.contains("is empty; remove it"), "{err}");
    }
}

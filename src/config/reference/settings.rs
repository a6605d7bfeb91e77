//! A running daemon's effective settings, key by key ([`Setting`]: the file's value or the
//! default), and what differs between two ([`Change`], [`diff`]), each change saying what a
//! reload does with it ([`Reload`]). `--check` prints settings with [`render`]; secrets are
//! never shown, a file's contents appear as a fingerprint.

use super::*;

/// The effective value of one key (a default when the file does not set it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub key: &'static str,
    /// As people read it; empty when unset.
    pub value: String,
    /// Never printed (tokens, passwords): compared, and shown as "(set)".
    pub secret: bool,
}

impl Setting {
    pub fn new(key: &'static str, value: impl fmt::Display) -> Setting {
        Setting {
            key,
            value: value.to_string(),
            secret: false,
        }
    }

    pub fn secret(key: &'static str, value: Option<&str>) -> Setting {
        Setting {
            key,
            value: value.unwrap_or_default().to_string(),
            secret: true,
        }
    }

    /// The value as it may be printed.
    pub fn shown(&self) -> String {
        match (self.secret, self.value.is_empty()) {
            (_, true) => "(none)".to_string(),
            (true, false) => "(set)".to_string(),
            (false, false) => self.value.clone(),
        }
    }
}

/// One key whose value differs between the running configuration and a new file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: &'static str,
    pub old: String,
    pub new: String,
    pub reload: Reload,
    pub note: &'static str,
}

impl Change {
    /// Whether a reload left it out (it needs a restart).
    pub fn needs_restart(&self) -> bool {
        self.reload == Reload::Restart
    }

    /// The line for a restart's answer: everything applies then.
    pub fn at_restart(&self) -> String {
        format!(
            "{}: {} -> {}: applied by the restart",
            self.key, self.old, self.new
        )
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} -> {}: {}",
            self.key,
            self.old,
            self.new,
            self.reload.effect()
        )?;
        if !self.note.is_empty() {
            write!(f, " ({})", self.note)?;
        }
        Ok(())
    }
}

/// The keys whose values differ, in the order of `keys`. A key without a setting (the
/// listeners, compared as a whole elsewhere) is skipped.
pub fn diff(keys: &[Key], old: &[Setting], new: &[Setting]) -> Vec<Change> {
    let find = |settings: &[Setting], name: &str| settings.iter().find(|s| s.key == name).cloned();
    keys.iter()
        .filter_map(|k| {
            let (a, b) = (find(old, k.name)?, find(new, k.name)?);
            (a.value != b.value).then(|| Change {
                key: k.name,
                old: a.shown(),
                new: if b.secret && !b.value.is_empty() && !a.value.is_empty() {
                    "(a new value)".to_string()
                } else {
                    b.shown()
                },
                reload: k.reload,
                note: k.note,
            })
        })
        .collect()
}

/// A short fingerprint of files' contents (TLS files rotated in place keep their paths, and a
/// reload must still see that they changed).
pub(crate) fn fingerprint(paths: &[&std::path::Path]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in paths {
        h.update(std::fs::read(p).unwrap_or_default());
    }
    h.finalize()
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Prints settings as `key = value` lines (for `--check`).
pub fn render(settings: &[Setting]) -> String {
    let width = settings.iter().map(|s| s.key.len()).max().unwrap_or(0);
    settings
        .iter()
        .map(|s| format!("  {:width$}  {}\n", s.key, s.shown()))
        .collect()
}

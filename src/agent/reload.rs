//! Which configuration the agent runs, and reloading it from agent.toml: one place for SIGHUP
//! and the admin API's `POST /api/reload`, so both read the file the same way, log the same
//! lines and count in the same generation. A file with an error is refused whole and the
//! running configuration kept; the refusal is remembered for `/api/status`.

use std::path::PathBuf;
use std::time::SystemTime;

use parking_lot::Mutex;

use super::report::{ConfigReport, ReloadAnswer, ReloadReport};
use crate::config::AgentConfig;

/// The generation and history of the agent's configuration.
#[derive(Debug)]
pub(crate) struct ConfigState {
    /// agent.toml, when the agent was started from a file (not for embedded agents).
    path: Option<PathBuf>,
    inner: Mutex<History>,
}

#[derive(Debug)]
struct History {
    generation: u64,
    digest: String,
    loaded_at: u64,
    last: Option<ReloadReport>,
    applied: u64,
    refused: u64,
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl ConfigState {
    pub fn new(config: &AgentConfig, path: Option<PathBuf>) -> Self {
        ConfigState {
            path,
            inner: Mutex::new(History {
                generation: 1,
                digest: config.digest(),
                loaded_at: unix_now(),
                last: None,
                applied: 0,
                refused: 0,
            }),
        }
    }

    fn history(&self) -> parking_lot::MutexGuard<'_, History> {
        self.inner.lock()
    }

    /// A new configuration is in force (from the file or from the embedding program).
    pub fn applied(&self, config: &AgentConfig) -> u64 {
        let mut h = self.history();
        h.generation += 1;
        h.digest = config.digest();
        h.loaded_at = unix_now();
        h.generation
    }

    pub fn report(&self) -> ConfigReport {
        let h = self.history();
        ConfigReport {
            path: self.path.as_ref().map(|p| p.display().to_string()),
            generation: h.generation,
            digest: h.digest.clone(),
            loaded_at: h.loaded_at,
            last_reload: h.last.clone(),
            reloads_applied: h.applied,
            reloads_refused: h.refused,
        }
    }
}

impl super::Agent {
    /// Re-reads agent.toml and applies it (every session pushes it; only changed listeners
    /// restart). `cause` names who asked, for the log (`SIGHUP`, `admin API`). A file with an
    /// error changes nothing: the error (file, line, field) is logged and returned.
    pub fn reload_file(&self, cause: &str) -> Result<ReloadAnswer, String> {
        let state = &self.config_state;
        let Some(path) = &state.path else {
            return Err("this agent was not started from a configuration file".into());
        };
        match AgentConfig::load(path) {
            Ok(mut config) => {
                // The admin server is the one answering this very call: it stays as it is.
                if config.admin != self.config.borrow().admin {
                    config.notices.push(
                        "[admin] changed: the admin server keeps its address and token until the agent restarts".into(),
                    );
                }
                for n in &config.notices {
                    tracing::warn!("{n}");
                }
                let notices = config.notices.clone();
                let digest = config.digest();
                let generation = self.reload(config);
                let mut h = state.history();
                h.applied += 1;
                h.last = Some(ReloadReport {
                    at: unix_now(),
                    ok: true,
                    error: None,
                });
                tracing::info!(
                    "{cause}: {} reloaded: configuration generation {generation}",
                    path.display()
                );
                Ok(ReloadAnswer {
                    action: "reload".into(),
                    generation,
                    digest,
                    notices,
                })
            }
            Err(e) => {
                let error = format!("reload refused, keeping the running config: {e}");
                tracing::error!("{cause}: {error}");
                let mut h = state.history();
                h.refused += 1;
                h.last = Some(ReloadReport {
                    at: unix_now(),
                    ok: false,
                    error: Some(e.to_string()),
                });
                Err(error)
            }
        }
    }
}

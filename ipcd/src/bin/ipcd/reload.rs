//! `SIGHUP`: reads the configuration file again, with the same command
//! line over it, and has the server switch to its settings (the allow
//! lists, the access rules, the limits) all at once. A file that cannot be
//! read, parsed or checked changes nothing: the error is logged and the
//! settings in force stay. What a reload cannot change (sockets, workers,
//! logging) is named in the log and left as it is.

use ipcd::ReloadHandle;

use crate::config::Config;
use crate::Args;

/// What a reload needs: the command line, and the configuration in force.
pub struct Reload {
    args: Args,
    config: Config,
    handle: ReloadHandle,
}

impl Reload {
    pub fn new(args: Args, config: Config, handle: ReloadHandle) -> Reload {
        Reload { args, config, handle }
    }

    /// One reload, logged.
    pub fn run(&mut self) {
        let Some(path) = self.args.config.clone() else {
            tracing::info!("SIGHUP: no --config file to read again; nothing changes");
            return;
        };
        let new = match crate::load(&self.args, Some(&path)) {
            Ok(new) => new,
            Err(err) => {
                tracing::error!("reload ignored, the configuration in force stays: {err:#}");
                return;
            }
        };
        let fixed = self.config.fixed_changes(&new);
        if !fixed.is_empty() {
            tracing::warn!("reload: {} change only on a restart; left as they are", fixed.join(", "));
        }
        match self.handle.apply(new.settings.clone()) {
            // The server logs what changed once it has switched.
            Ok(()) => self.config.settings = new.settings,
            Err(err) => tracing::error!("reload ignored, the configuration in force stays: {err}"),
        }
    }
}

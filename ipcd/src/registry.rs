//! Who provides which name: the broker's table of registered names.
//!
//! A name is held by one provider (exclusive, the default) or by several
//! (pooled: each new session goes to the holder with the fewest). A
//! provider registers all its names at once, all or none; its hang-up
//! frees them all at once. Pure bookkeeping: the broker (`broker.rs`)
//! checks names and permissions first, and keeps the connections.

use std::collections::HashMap;

use ipc_core::control::RegisterError;
use ipc_core::Credentials;

/// The broker's id for a provider connection.
pub(crate) type ProviderId = u64;

#[derive(Debug)]
struct Holders {
    pooled: bool,
    /// In registration order.
    providers: Vec<ProviderId>,
}

/// Names and their holders.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    names: HashMap<String, Holders>,
}

impl Registry {
    /// Gives `names` to `provider`, all of them or none: a name held
    /// exclusively by another, or held in the other mode, is refused,
    /// naming a holder (`creds` tells who a provider is).
    pub(crate) fn register(
        &mut self,
        provider: ProviderId,
        names: &[String],
        pooled: bool,
        creds: impl Fn(ProviderId) -> Credentials,
    ) -> Result<(), RegisterError> {
        for name in names {
            if let Some(h) = self.names.get(name) {
                let holder = *h.providers.first().expect("a name with no holder is removed");
                if !(pooled && h.pooled) {
                    return Err(RegisterError::Taken { name: name.clone(), holder: creds(holder) });
                }
            }
        }
        for name in names {
            let h = self.names.entry(name.clone()).or_insert(Holders { pooled, providers: Vec::new() });
            if !h.providers.contains(&provider) {
                h.providers.push(provider);
            }
        }
        Ok(())
    }

    /// Frees every name `provider` holds.
    pub(crate) fn unregister(&mut self, provider: ProviderId) {
        self.names.retain(|_, h| {
            h.providers.retain(|&p| p != provider);
            !h.providers.is_empty()
        });
    }

    /// The holders of `name`, in registration order (empty if none).
    pub(crate) fn holders(&self, name: &str) -> &[ProviderId] {
        self.names.get(name).map_or(&[], |h| &h.providers)
    }

    /// Every name with its holders, sorted by name (for `stats`).
    pub(crate) fn entries(&self) -> Vec<(&str, bool, &[ProviderId])> {
        let mut all: Vec<_> = self.names.iter().map(|(n, h)| (n.as_str(), h.pooled, h.providers.as_slice())).collect();
        all.sort_by(|a, b| a.0.cmp(b.0));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(p: ProviderId) -> Credentials {
        Credentials { pid: p as i32 * 100, uid: 1000 + p as u32, gid: 100 }
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn an_exclusive_name_is_refused_to_a_second_provider_naming_the_holder() {
        let mut r = Registry::default();
        r.register(1, &names(&["a.x", "a.y"]), false, who).unwrap();
        let err = r.register(2, &names(&["b", "a.y"]), false, who).unwrap_err();
        assert_eq!(err, RegisterError::Taken { name: "a.y".into(), holder: who(1) });
        assert!(r.holders("b").is_empty(), "all or nothing: b was not given to 2");
        // Pooled may not join an exclusive holder either.
        assert!(r.register(2, &names(&["a.x"]), true, who).is_err());
    }

    #[test]
    fn pooled_names_gather_holders_and_a_hang_up_frees_all_names_at_once() {
        let mut r = Registry::default();
        r.register(1, &names(&["s"]), true, who).unwrap();
        r.register(2, &names(&["s", "t"]), true, who).unwrap();
        assert_eq!(r.holders("s"), &[1, 2]);
        assert_eq!(r.entries(), vec![("s", true, &[1u64, 2][..]), ("t", true, &[2u64][..])]);
        assert!(r.register(3, &names(&["s"]), false, who).is_err(), "exclusive may not join a pool");
        r.unregister(2);
        assert_eq!(r.holders("s"), &[1]);
        assert!(r.holders("t").is_empty());
        r.unregister(1);
        assert!(r.entries().is_empty());
        // Free again: anyone may take it, in either mode.
        r.register(3, &names(&["s"]), false, who).unwrap();
        assert_eq!(r.holders("s"), &[3]);
    }
}

//! Who may provide and who may call which names.
//!
//! Rules are checked with the credentials the kernel recorded for the
//! connection (`SO_PEERCRED`), which the peer can neither change nor forge.
//! Each rule names a pattern (`search.query`, `search.*`, or `*`) and,
//! optionally, the uids and gids allowed to provide and to call what it
//! matches; the first rule whose pattern matches a name decides, and a list
//! a rule leaves out falls back to the default. Without rules (or for a
//! name no rule matches) the defaults hold: only the daemon's own uid, or
//! root, may provide; anyone who can open the socket may call.
//!
//! A gid matches the peer's primary gid (the one `SO_PEERCRED` reports);
//! supplementary groups are not consulted.

use ipc_core::Credentials;

/// The uids and gids a rule admits for one of its two rights.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allowed {
    /// Admitted uids.
    pub uids: Vec<u32>,
    /// Admitted primary gids.
    pub gids: Vec<u32>,
}

impl Allowed {
    fn admits(&self, who: &Credentials) -> bool {
        self.uids.contains(&who.uid) || self.gids.contains(&who.gid)
    }
}

/// One access rule; see the module docs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessRule {
    /// `name`, `prefix.*` (the prefix and every name below it) or `*`.
    pub pattern: String,
    /// Who may provide the names it matches (`None`: the default).
    pub provide: Option<Allowed>,
    /// Who may call them (`None`: the default, anyone).
    pub call: Option<Allowed>,
}

impl AccessRule {
    /// Checks the pattern's syntax: a valid name, optionally ending in
    /// `.*`, or `*` alone.
    pub fn check_pattern(pattern: &str) -> Result<(), String> {
        if pattern == "*" {
            return Ok(());
        }
        let name = pattern.strip_suffix(".*").unwrap_or(pattern);
        ipc_core::control::check_name(name).map_err(|e| format!("pattern {pattern:?}: {e}"))
    }

    fn matches(&self, name: &str) -> bool {
        match self.pattern.strip_suffix(".*") {
            _ if self.pattern == "*" => true,
            Some(prefix) => name == prefix || name.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('.')),
            None => name == self.pattern,
        }
    }
}

/// The daemon's access rules.
#[derive(Clone, Debug, Default)]
pub(crate) struct Policy {
    rules: Vec<AccessRule>,
    /// The daemon's own uid, which may provide by default.
    daemon_uid: u32,
}

impl Policy {
    pub(crate) fn new(rules: Vec<AccessRule>, daemon_uid: u32) -> Policy {
        Policy { rules, daemon_uid }
    }

    fn rule(&self, name: &str) -> Option<&AccessRule> {
        self.rules.iter().find(|r| r.matches(name))
    }

    /// Whether `who` may provide `name`, or why not (the reason names the
    /// process and the name, for it and for the log).
    pub(crate) fn may_provide(&self, name: &str, who: &Credentials) -> Result<(), String> {
        let allowed = match self.rule(name).and_then(|r| r.provide.as_ref()) {
            Some(allowed) => allowed.admits(who),
            None => who.uid == self.daemon_uid || who.uid == 0,
        };
        if allowed {
            return Ok(());
        }
        Err(format!("{who} may not provide {name:?}"))
    }

    /// Whether `who` may call `name`, or why not.
    pub(crate) fn may_call(&self, name: &str, who: &Credentials) -> Result<(), String> {
        match self.rule(name).and_then(|r| r.call.as_ref()) {
            Some(allowed) if !allowed.admits(who) => Err(format!("{who} may not call {name:?}")),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(uid: u32, gid: u32) -> Credentials {
        Credentials { pid: 42, uid, gid }
    }

    fn rule(pattern: &str, provide: Option<Allowed>, call: Option<Allowed>) -> AccessRule {
        AccessRule { pattern: pattern.into(), provide, call }
    }

    #[test]
    fn without_rules_only_the_daemon_uid_or_root_provides_and_anyone_calls() {
        let p = Policy::new(vec![], 500);
        assert_eq!(p.may_provide("a.b", &who(500, 1)), Ok(()));
        assert_eq!(p.may_provide("a.b", &who(0, 1)), Ok(()));
        let err = p.may_provide("a.b", &who(1000, 1)).unwrap_err();
        assert!(err.contains("uid 1000") && err.contains("\"a.b\""), "{err}");
        assert_eq!(p.may_call("a.b", &who(12345, 9)), Ok(()));
    }

    #[test]
    fn the_first_matching_rule_decides_by_uid_or_gid() {
        let search = Allowed { uids: vec![1000], gids: vec![] };
        let callers = Allowed { uids: vec![], gids: vec![100] };
        let p = Policy::new(
            vec![
                rule("search.admin", None, Some(Allowed { uids: vec![0], gids: vec![] })),
                rule("search.*", Some(search), Some(callers)),
            ],
            500,
        );
        assert_eq!(p.may_provide("search.query", &who(1000, 1)), Ok(()));
        assert!(p.may_provide("search.query", &who(500, 1)).is_err(), "a rule's list replaces the default");
        assert_eq!(p.may_call("search.query", &who(7, 100)), Ok(()), "by gid");
        assert!(p.may_call("search.query", &who(7, 101)).is_err());
        assert_eq!(p.may_call("search", &who(7, 100)), Ok(()), "the prefix itself matches");
        assert_eq!(p.may_call("searchx", &who(7, 101)), Ok(()), "not a word of search.*: default");
        // The earlier, narrower rule wins; its provide list is left to the default.
        assert!(p.may_call("search.admin", &who(7, 100)).is_err());
        assert_eq!(p.may_provide("search.admin", &who(500, 1)), Ok(()));
    }

    #[test]
    fn patterns_are_checked() {
        for good in ["*", "a", "a.*", "a.b.*"] {
            assert_eq!(AccessRule::check_pattern(good), Ok(()), "{good}");
        }
        for bad in ["", "a.", "*.a", "a*", "a.**", "a b.*"] {
            assert!(AccessRule::check_pattern(bad).is_err(), "{bad}");
        }
    }
}

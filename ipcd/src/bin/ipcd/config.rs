//! The daemon's configuration file (`ipcd --config PATH`, TOML): who may
//! provide and who may call brokered names. `ipcd/dist/ipcd.toml` is a
//! documented example.
//!
//! ```toml
//! [[access]]
//! pattern = "search.*"          # a name, `prefix.*`, or `*`
//! provide = { uids = [1000] }   # who may register the names it matches
//! call = { gids = [100] }       # who may resolve them
//! ```
//!
//! Rules are checked in order and the first whose pattern matches a name
//! decides; a list a rule leaves out keeps the default (only the daemon's
//! own uid and root provide; anyone who can open the socket calls). Unknown
//! keys are errors, so that a misspelt rule never silently admits more.

use std::path::Path;

use anyhow::Context;
use ipcd::{AccessRule, Allowed};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    access: Vec<Access>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Access {
    pattern: String,
    provide: Option<Who>,
    call: Option<Who>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Who {
    #[serde(default)]
    uids: Vec<u32>,
    #[serde(default)]
    gids: Vec<u32>,
}

impl From<Who> for Allowed {
    fn from(who: Who) -> Allowed {
        Allowed { uids: who.uids, gids: who.gids }
    }
}

/// The access rules of the file at `path`, checked.
pub fn load(path: &Path) -> anyhow::Result<Vec<AccessRule>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse(&text).with_context(|| format!("in {}", path.display()))
}

fn parse(text: &str) -> anyhow::Result<Vec<AccessRule>> {
    let file: File = toml::from_str(text)?;
    file.access
        .into_iter()
        .enumerate()
        .map(|(i, a)| {
            AccessRule::check_pattern(&a.pattern).map_err(|e| anyhow::anyhow!("access rule {}: {e}", i + 1))?;
            Ok(AccessRule { pattern: a.pattern, provide: a.provide.map(Into::into), call: a.call.map(Into::into) })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_in_order_with_left_out_lists_left_to_the_default() {
        let rules = parse(
            r#"
            [[access]]
            pattern = "search.*"
            provide = { uids = [1000] }
            call = { gids = [100, 101] }

            [[access]]
            pattern = "*"
            call = {}
            "#,
        )
        .unwrap();
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].pattern, "search.*");
        assert_eq!(rules[0].provide, Some(Allowed { uids: vec![1000], gids: vec![] }));
        assert_eq!(rules[0].call, Some(Allowed { uids: vec![], gids: vec![100, 101] }));
        assert_eq!(rules[1].provide, None, "left out: the default");
        assert_eq!(rules[1].call, Some(Allowed::default()), "given empty: nobody");
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn mistakes_are_errors_naming_them() {
        let typo = parse("[[access]]\npattern = \"a\"\ncall = { uid = [1] }\n").unwrap_err();
        assert!(format!("{typo:#}").contains("uid"), "{typo:#}");
        let pattern = parse("[[access]]\npattern = \"a..b\"\n").unwrap_err();
        assert!(format!("{pattern:#}").contains("access rule 1"), "{pattern:#}");
        assert!(parse("[[access]]\n").is_err(), "a rule names its pattern");
        assert!(parse("access = 3").is_err());
    }
}

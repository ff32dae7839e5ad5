//! The daemon's configuration file (`ipcd --config PATH`, TOML): who may
//! provide and who may call brokered names, and the largest message.
//! `ipcd/dist/ipcd.toml` is a documented example.
//!
//! ```toml
//! max_message = "256M"          # bytes, or a string with K, M, G, T
//!
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
    max_message: Option<Size>,
    #[serde(default)]
    access: Vec<Access>,
}

/// A size in bytes: a number, or a string with a suffix.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Size {
    Bytes(u64),
    Text(String),
}

/// What the configuration file says.
#[derive(Debug, Default)]
pub struct Config {
    /// The access rules, in order.
    pub rules: Vec<AccessRule>,
    /// The largest message, if the file gives it (`--max-message` wins).
    pub max_message: Option<u64>,
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

/// The configuration in the file at `path`, checked.
pub fn load(path: &Path) -> anyhow::Result<Config> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse(&text).with_context(|| format!("in {}", path.display()))
}

fn parse(text: &str) -> anyhow::Result<Config> {
    let file: File = toml::from_str(text)?;
    let max_message = match file.max_message {
        None => None,
        Some(Size::Bytes(0)) => anyhow::bail!("max_message must be at least 1 byte"),
        Some(Size::Bytes(n)) => Some(n),
        Some(Size::Text(text)) => {
            Some(super::parse_positive_bytes(&text).map_err(|e| anyhow::anyhow!("max_message: {e}"))?)
        }
    };
    let rules = file
        .access
        .into_iter()
        .enumerate()
        .map(|(i, a)| {
            AccessRule::check_pattern(&a.pattern).map_err(|e| anyhow::anyhow!("access rule {}: {e}", i + 1))?;
            Ok(AccessRule { pattern: a.pattern, provide: a.provide.map(Into::into), call: a.call.map(Into::into) })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Config { rules, max_message })
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
        .unwrap()
        .rules;
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].pattern, "search.*");
        assert_eq!(rules[0].provide, Some(Allowed { uids: vec![1000], gids: vec![] }));
        assert_eq!(rules[0].call, Some(Allowed { uids: vec![], gids: vec![100, 101] }));
        assert_eq!(rules[1].provide, None, "left out: the default");
        assert_eq!(rules[1].call, Some(Allowed::default()), "given empty: nobody");
        assert!(parse("").unwrap().rules.is_empty());
    }

    #[test]
    fn mistakes_are_errors_naming_them() {
        let typo = parse("[[access]]\npattern = \"a\"\ncall = { uid = [1] }\n").unwrap_err();
        assert!(format!("{typo:#}").contains("uid"), "{typo:#}");
        let pattern = parse("[[access]]\npattern = \"a..b\"\n").unwrap_err();
        assert!(format!("{pattern:#}").contains("access rule 1"), "{pattern:#}");
        assert!(parse("[[access]]\n").is_err(), "a rule names its pattern");
        assert!(parse("access = 3").is_err());
        assert!(format!("{:#}", parse("max_message = 0").unwrap_err()).contains("at least 1 byte"));
        assert!(format!("{:#}", parse("max_message = \"lots\"").unwrap_err()).contains("max_message"));
    }

    #[test]
    fn the_largest_message_is_a_number_or_a_size_with_a_suffix() {
        assert_eq!(parse("").unwrap().max_message, None);
        assert_eq!(parse("max_message = 4096").unwrap().max_message, Some(4096));
        assert_eq!(parse("max_message = \"256M\"").unwrap().max_message, Some(256 << 20));
        let example = parse(include_str!("../../../dist/ipcd.toml")).expect("the shipped example parses");
        assert_eq!(example.max_message, Some(1 << 30));
    }
}

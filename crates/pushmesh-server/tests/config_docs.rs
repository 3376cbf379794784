//! docs/configuration.md matches the binary: every key of the TOML file
//! (at every table), every flag and every environment variable the parser
//! knows is documented there, and everything the page names exists.
//!
//! The parser's own lists: the file's keys come from serde's "unknown
//! field" error at each table (it lists every field it expects), the flags
//! and variables from clap's definition of `Cli`.

use std::collections::BTreeSet;

use clap::CommandFactory;
use pushmesh_server::config::{Cli, FileConfig, KNOWN_ENV};

fn doc() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/configuration.md");
    std::fs::read_to_string(path).expect("docs/configuration.md")
}

/// The keys serde expects in the table that `prefix` opens (an unknown
/// key is put in it and the error lists the expected ones).
fn keys_of(prefix: &str) -> Vec<String> {
    let text = format!("{prefix}\nzz_not_a_key = 1\n");
    let err = match FileConfig::parse(&text) {
        Ok(_) => panic!("unknown key accepted under {prefix:?}"),
        Err(e) => e.to_string(),
    };
    let list = err
        .split("expected one of ")
        .nth(1)
        .or_else(|| err.split("expected ").nth(1))
        .unwrap_or_else(|| panic!("no expected-field list in {err:?}"));
    list.split(", ")
        .map(|k| k.trim().trim_matches('`').trim_end_matches('`'))
        .map(|k| k.split('`').next().unwrap_or(k).to_string())
        .filter(|k| !k.is_empty())
        .collect()
}

const APP: &str = "[[apps]]\nid = \"a\"\nkey = \"k\"\nsecret = \"s\"";

#[test]
fn every_file_key_is_documented() {
    let doc = doc();
    let tables: Vec<(String, String)> = vec![
        ("top level".into(), String::new()),
        ("[cluster]".into(), "[cluster]".into()),
        ("[identity_headers]".into(), "[identity_headers]".into()),
        ("[[apps]]".into(), APP.into()),
        ("[apps.history]".into(), format!("{APP}\n[apps.history]")),
        (
            "[apps.authorizer]".into(),
            format!("{APP}\n[apps.authorizer]\nurl = \"http://x\""),
        ),
        (
            "[[apps.webhooks]]".into(),
            format!("{APP}\n[[apps.webhooks]]\nurl = \"http://x\""),
        ),
        ("[apps.limits]".into(), format!("{APP}\n[apps.limits]")),
    ];
    let mut missing = Vec::new();
    let mut total = 0;
    for (name, prefix) in &tables {
        let keys = keys_of(prefix);
        assert!(keys.len() >= 3, "{name}: too few keys parsed: {keys:?}");
        for k in keys {
            total += 1;
            // In the page's TOML block, as `key = ...` at the start of a line.
            // A sub-table is documented by its header.
            let documented = doc.lines().map(str::trim_start).any(|l| {
                l.starts_with(&format!("{k} ="))
                    || [format!("[{k}]"), format!("[[{k}]]")]
                        .iter()
                        .chain(&[format!("[apps.{k}]"), format!("[[apps.{k}]]")])
                        .any(|h| l.starts_with(h.as_str()))
            });
            if !documented {
                missing.push(format!("{name} {k}"));
            }
        }
    }
    assert!(total > 60, "only {total} keys found");
    assert!(
        missing.is_empty(),
        "keys the binary accepts but docs/configuration.md does not show: {missing:?}"
    );
}

#[test]
fn every_flag_and_variable_is_documented_and_every_documented_one_exists() {
    let doc = doc();
    let cmd = Cli::command();
    let mut flags = BTreeSet::new();
    let mut envs = BTreeSet::new();
    for a in cmd.get_arguments() {
        if let Some(l) = a.get_long() {
            flags.insert(format!("--{l}"));
        }
        if let Some(e) = a.get_env() {
            envs.insert(e.to_string_lossy().into_owned());
        }
    }
    let known: BTreeSet<String> = KNOWN_ENV.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        envs, known,
        "KNOWN_ENV (typo warnings) and the flags' variables differ"
    );
    let undocumented_flags: Vec<&String> = flags
        .iter()
        .filter(|f| !doc.contains(&format!("`{f}")) && !doc.contains(&format!(" {f}")))
        .collect();
    assert!(
        undocumented_flags.is_empty(),
        "flags missing from docs/configuration.md: {undocumented_flags:?}"
    );
    let undocumented_envs: Vec<&String> = envs.iter().filter(|e| !doc.contains(*e)).collect();
    assert!(
        undocumented_envs.is_empty(),
        "variables missing from docs/configuration.md: {undocumented_envs:?}"
    );
    // The converse: whatever the page names exists.
    let word = |s: &str| {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
            .collect::<String>()
    };
    for part in doc.split("PUSHMESH_").skip(1) {
        let name = format!("PUSHMESH_{}", word(part));
        assert!(
            known.contains(&name) || name == "PUSHMESH_" || doc_allows_unknown(&name),
            "docs/configuration.md names {name}, which the binary does not read"
        );
    }
    for part in doc.split("`--").skip(1) {
        let flag = format!("--{}", word(part));
        let sub = ["--out", "--node", "--help", "--version"];
        assert!(
            flags.contains(&flag) || sub.contains(&flag.as_str()),
            "docs/configuration.md names {flag}, which is not a flag"
        );
    }
}

/// Variables the page names as examples of what is *not* read (typos,
/// Kubernetes service links, a test harness's).
fn doc_allows_unknown(name: &str) -> bool {
    [
        "PUSHMESH_LISTN",
        "PUSHMESH_SERVICE_HOST",
        "PUSHMESH_SERVICE_PORT",
        "PUSHMESH_PORT",
        "PUSHMESH_PORT_80_TCP",
        "PUSHMESH_PEERS_SERVICE_PORT",
        "PUSHMESH_BIN",
        "PUSHMESH_X",
        "PUSHMESH_BUILD_COMMIT",
    ]
    .contains(&name)
}

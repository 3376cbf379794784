//! Layering and strictness of the configuration.

use clap::Parser;

use super::*;

fn cli(args: &[&str]) -> Cli {
    let mut v = vec!["pushmesh"];
    v.extend_from_slice(args);
    Cli::try_parse_from(v).unwrap_or_else(|e| panic!("{e}"))
}

/// Flags alone, no file.
fn flags(args: &[&str]) -> Result<Config, ConfigError> {
    Config::resolve(FileConfig::default(), cli(args))
}

/// Flags alone after `--gossip-listen 127.0.0.1:7000` and a cluster secret.
fn clustered(args: &[&str]) -> Result<Config, ConfigError> {
    let mut v = vec![
        "--gossip-listen",
        "127.0.0.1:7000",
        "--cluster-secret",
        "0123456789abcdef",
    ];
    v.extend_from_slice(args);
    flags(&v)
}

#[test]
fn defaults_to_development_app() {
    let c = flags(&[]).unwrap_or_else(|e| panic!("{e}"));
    assert!(c.development);
    assert_eq!(c.apps[0].key, "app-key");
    assert_eq!(c.listen.port(), 6001);
}

#[test]
fn flags_override_file() {
    let file = FileConfig::parse(
        r#"
listen = "127.0.0.1:7000"
activity_timeout = 60
[[apps]]
id = "1"
key = "k"
secret = "s"
client_events = true
[apps.limits]
max_presence_members = 5
"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let c = Config::resolve(file, cli(&["--listen", "127.0.0.1:7001"]))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.listen.port(), 7001);
    assert_eq!(c.activity_timeout, Duration::from_secs(60));
    assert!(!c.development);
    assert_eq!(c.apps[0].limits.max_presence_members, 5);
    assert_eq!(c.apps[0].limits.max_event_channels, 100);
}

#[test]
fn app_flags_replace_apps() {
    let c = flags(&["--app", "1:a:b", "--app", "2:c:d:e"]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.apps.len(), 2);
    assert_eq!(c.apps[1].secret, "d:e");
    assert!(flags(&["--app", "1::b"]).is_err());
    assert!(flags(&["--app", "1:a:b", "--app", "1:c:d"]).is_err());
}

#[test]
fn example_cluster_configs_resolve() {
    for i in 1..=3 {
        let path = format!(
            "{}/../../deploy/cluster/node{i}.toml",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let file = FileConfig::parse(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
        let c = Config::resolve(file, cli(&["--cluster-secret", "0123456789abcdef0123"]))
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        let cl = c
            .cluster
            .unwrap_or_else(|| panic!("{path}: clustering off"));
        assert_eq!(cl.node_id, format!("node{i}"));
        assert_eq!(cl.seeds.len(), 3);
        assert!(cl.certs.is_some());
    }
}

#[test]
fn cluster_settings_are_checked() {
    let none = flags(&[]).unwrap_or_else(|e| panic!("{e}"));
    assert!(none.cluster.is_none());
    let no_secret = flags(&["--gossip-listen", "127.0.0.1:7000"]);
    assert!(matches!(no_secret, Err(ConfigError::Invalid(m)) if m.contains("secret")));
    let unspecified = flags(&[
        "--gossip-listen",
        "0.0.0.0:7000",
        "--cluster-secret",
        "0123456789abcdef",
    ]);
    assert!(matches!(unspecified, Err(ConfigError::Invalid(m)) if m.contains("advertise")));
    let half_certs = clustered(&["--cluster-ca", "x"]);
    assert!(half_certs.is_err());
    let ok = clustered(&["--seed", "a:1,b:2"]).unwrap_or_else(|e| panic!("{e}"));
    let reserved = clustered(&["--node-id", "pushmesh-node"]);
    assert!(matches!(reserved, Err(ConfigError::Invalid(m)) if m.contains("reserved")));
    let cl = ok.cluster.unwrap_or_else(|| panic!("clustering off"));
    assert_eq!(cl.cluster_listen.port(), 7001);
    assert_eq!(cl.seeds, vec!["a:1".to_string(), "b:2".to_string()]);
}

#[test]
fn strict() {
    assert!(FileConfig::parse("lisen = \"x\"").is_err());
    assert!(FileConfig::parse("[[apps]]\nid=\"1\"\nkey=\"k\"\nsecret=\"s\"\nbogus=1").is_err());
    // Unknown environment variables are reported, never refused.
    assert!(check_env(["PUSHMESH_LISTEN".to_string()]).is_empty());
    assert_eq!(
        check_env(["PUSHMESH_LISTN".to_string()]).typos,
        vec![("PUSHMESH_LISTN".to_string(), "PUSHMESH_LISTEN")]
    );
}

#[test]
fn edge_admission_keys_from_file_and_flags() {
    let d = flags(&[]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(d.max_pending_handshakes_per_ip, 128);
    assert_eq!(d.request_body_timeout, Duration::from_secs(10));
    assert_eq!(
        d.forwarded_header,
        crate::forwarded::ForwardedHeader::XForwardedFor
    );
    let file = FileConfig::parse(
        r#"
max_pending_handshakes_per_ip = 7
request_body_timeout_ms = 1500
forwarded_header = "forwarded"
"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let c = Config::resolve(file, cli(&[])).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.max_pending_handshakes_per_ip, 7);
    assert_eq!(c.request_body_timeout, Duration::from_millis(1500));
    assert_eq!(
        c.forwarded_header,
        crate::forwarded::ForwardedHeader::Forwarded
    );
    let flags = cli(&[
        "--max-pending-handshakes-per-ip",
        "3",
        "--request-body-timeout-ms",
        "200",
        "--forwarded-header",
        "x-forwarded-for",
    ]);
    let file =
        FileConfig::parse("forwarded_header = \"forwarded\"\nmax_pending_handshakes_per_ip = 7")
            .unwrap_or_else(|e| panic!("{e}"));
    let c = Config::resolve(file, flags).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.max_pending_handshakes_per_ip, 3, "the flag wins");
    assert_eq!(c.request_body_timeout, Duration::from_millis(200));
    assert_eq!(
        c.forwarded_header,
        crate::forwarded::ForwardedHeader::XForwardedFor
    );
    assert!(FileConfig::parse("forwarded_header = \"x-real-ip\"").is_err());
    let zero = FileConfig::parse("request_body_timeout_ms = 0").unwrap_or_else(|e| panic!("{e}"));
    assert!(Config::resolve(zero, cli(&[])).is_err());
}

#[test]
fn compression_settings() {
    let d = flags(&[]).unwrap_or_else(|e| panic!("{e}"));
    assert!(d.compression.enabled, "on by default");
    assert_eq!((d.compression.min_bytes, d.compression.level), (256, 1));
    let file = FileConfig::parse(
        "compression = false\ncompression_min_bytes = 1000\ncompression_level = 6\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let c = Config::resolve(
        file,
        cli(&["--compression", "true", "--compression-level", "9"]),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(c.compression.enabled, "the flag wins");
    assert_eq!((c.compression.min_bytes, c.compression.level), (1000, 9));
    for bad in ["0", "10"] {
        match flags(&["--compression-level", bad]) {
            Err(e) => assert!(e.to_string().contains("compression_level"), "{e}"),
            Ok(_) => panic!("level {bad} accepted"),
        }
    }
    let file = FileConfig::parse("compression_level = 0\n").unwrap_or_else(|e| panic!("{e}"));
    assert!(Config::resolve(file, cli(&[])).is_err());
}

//! Unknown `PUSHMESH_*` environment variables. The known ones are read by
//! clap; an unknown one never stops the node, because platforms set
//! variables of their own: Kubernetes injects service links
//! (`PUSHMESH_SERVICE_HOST`, `PUSHMESH_PORT_6001_TCP`, … for a Service named
//! `pushmesh`), which are ignored silently. A likely typo of a known name is
//! reported with that name; any other unknown variable is reported once.

use std::fmt;

/// Environment variables the node reads.
pub const KNOWN_ENV: &[&str] = &[
    "PUSHMESH_CONFIG",
    "PUSHMESH_LISTEN",
    "PUSHMESH_APPS",
    "PUSHMESH_ACTIVITY_TIMEOUT",
    "PUSHMESH_MAX_CONNECTIONS",
    "PUSHMESH_LOG",
    "PUSHMESH_LOG_FORMAT",
    "PUSHMESH_AUTHORIZER_URL",
    "PUSHMESH_BROADCASTING_KEY",
    "PUSHMESH_NODE_ID",
    "PUSHMESH_TRUSTED_PROXIES",
    "PUSHMESH_PROXY_PROTOCOL",
    "PUSHMESH_CLUSTER_ID",
    "PUSHMESH_GOSSIP_LISTEN",
    "PUSHMESH_GOSSIP_ADVERTISE",
    "PUSHMESH_CLUSTER_LISTEN",
    "PUSHMESH_CLUSTER_ADVERTISE",
    "PUSHMESH_SEEDS",
    "PUSHMESH_CLUSTER_SECRET",
    "PUSHMESH_CLUSTER_SECRET_FILE",
    "PUSHMESH_CLUSTER_CA",
    "PUSHMESH_CLUSTER_CERT",
    "PUSHMESH_CLUSTER_KEY",
    "PUSHMESH_TLS_CERT",
    "PUSHMESH_TLS_KEY",
    "PUSHMESH_METRICS_LISTEN",
    "PUSHMESH_DASHBOARD_TOKEN",
    "PUSHMESH_ADMIN_TOKEN",
    "PUSHMESH_ADMIN_TOKEN_FILE",
    "PUSHMESH_DATA_DIR",
    "PUSHMESH_MIN_CLUSTER_SIZE",
    "PUSHMESH_FORWARDED_HEADER",
    "PUSHMESH_MAX_PENDING_HANDSHAKES_PER_IP",
    "PUSHMESH_REQUEST_BODY_TIMEOUT_MS",
    "PUSHMESH_COMPRESSION",
    "PUSHMESH_COMPRESSION_MIN_BYTES",
    "PUSHMESH_COMPRESSION_LEVEL",
];

const PREFIX: &str = "PUSHMESH_";

/// What the environment holds beyond the known variables.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EnvReport {
    /// Likely typos: (variable, the known name it is closest to).
    pub typos: Vec<(String, &'static str)>,
    /// Other unknown variables (not Kubernetes service links).
    pub unknown: Vec<String>,
}

impl EnvReport {
    /// Whether there is nothing to report.
    pub fn is_empty(&self) -> bool {
        self.typos.is_empty() && self.unknown.is_empty()
    }
}

/// One line per typo, then one line for every other unknown variable.
impl fmt::Display for EnvReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, known) in &self.typos {
            writeln!(
                f,
                "unknown environment variable {name} ignored: did you mean {known}?"
            )?;
        }
        if !self.unknown.is_empty() {
            writeln!(
                f,
                "unknown environment variables ignored: {}",
                self.unknown.join(", ")
            )?;
        }
        Ok(())
    }
}

/// Sorts the `PUSHMESH_*` names of an environment into typos and other
/// unknown variables; known names and service links are left out.
pub fn check_env(names: impl IntoIterator<Item = String>) -> EnvReport {
    let mut names: Vec<String> = names
        .into_iter()
        .filter(|n| {
            n.get(..PREFIX.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(PREFIX))
        })
        .filter(|n| !KNOWN_ENV.contains(&n.as_str()) && !is_service_link(n))
        .collect();
    names.sort();
    names.dedup();
    let mut report = EnvReport::default();
    for n in names {
        match closest_known(&n) {
            Some(known) => report.typos.push((n, known)),
            None => report.unknown.push(n),
        }
    }
    report
}

/// The known name `name` is most likely a typo of, if any: at most one edit
/// away for short names, two for longer ones (case ignored).
pub fn closest_known(name: &str) -> Option<&'static str> {
    let upper = name.to_ascii_uppercase();
    let tail = upper.get(PREFIX.len()..)?;
    KNOWN_ENV
        .iter()
        .filter_map(|k| {
            let k_tail = &k[PREFIX.len()..];
            let allowed = if k_tail.len() <= 5 { 1 } else { 2 };
            let d = distance(tail, k_tail);
            (d <= allowed).then_some((d, *k))
        })
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Optimal string alignment distance: insertions, deletions, substitutions
/// and transpositions of adjacent characters each count one.
fn distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let w = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * w];
    for i in 0..=a.len() {
        d[i * w] = i;
    }
    for (j, cell) in d.iter_mut().enumerate().take(w) {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[(i - 1) * w + j] + 1)
                .min(d[i * w + j - 1] + 1)
                .min(d[(i - 1) * w + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[(i - 2) * w + j - 2] + 1);
            }
            d[i * w + j] = v;
        }
    }
    d[a.len() * w + b.len()]
}

/// Whether `name` is a Kubernetes service-link variable of a Service named
/// `pushmesh` or `pushmesh-<x>`: `<S>_SERVICE_HOST`, `<S>_SERVICE_PORT`,
/// `<S>_SERVICE_PORT_<NAME>`, `<S>_PORT`, `<S>_PORT_<N>_<PROTO>` and
/// `<S>_PORT_<N>_<PROTO>_{PROTO,PORT,ADDR}`, with `<S>` = `PUSHMESH` or
/// `PUSHMESH_<X>`.
pub fn is_service_link(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("PUSHMESH") else {
        return false;
    };
    let label = |s: &str| {
        s.is_empty()
            || s.strip_prefix('_').is_some_and(|x| {
                !x.is_empty()
                    && x.bytes()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_')
            })
    };
    rest.match_indices('_').any(|(i, _)| {
        let (service, suffix) = rest.split_at(i);
        label(service) && link_suffix(suffix)
    })
}

fn link_suffix(s: &str) -> bool {
    if let Some(after) = s.strip_prefix("_SERVICE_") {
        return after == "HOST"
            || after == "PORT"
            || after.strip_prefix("PORT_").is_some_and(|p| !p.is_empty());
    }
    let Some(after) = s.strip_prefix("_PORT") else {
        return false;
    };
    if after.is_empty() {
        return true;
    }
    let mut parts = after.split('_').skip(1);
    let number = parts
        .next()
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()));
    let proto = parts
        .next()
        .is_some_and(|p| matches!(p, "TCP" | "UDP" | "SCTP"));
    let field = match parts.next() {
        None => true,
        Some(f) => matches!(f, "PROTO" | "PORT" | "ADDR") && parts.next().is_none(),
    };
    after.starts_with('_') && number && proto && field
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(names: &[&str]) -> EnvReport {
        check_env(names.iter().map(|s| s.to_string()))
    }

    #[test]
    fn known_names_and_other_prefixes_are_not_reported() {
        let mut names: Vec<&str> = KNOWN_ENV.to_vec();
        names.extend([
            "PATH",
            "HOME",
            "RUST_LOG",
            "PUSHMESHX",
            "MY_PUSHMESH_LISTEN",
        ]);
        assert!(report(&names).is_empty(), "{}", report(&names));
    }

    #[test]
    fn kubernetes_service_links_are_ignored_silently() {
        let links = [
            "PUSHMESH_SERVICE_HOST",
            "PUSHMESH_SERVICE_PORT",
            "PUSHMESH_SERVICE_PORT_HTTP",
            "PUSHMESH_PORT",
            "PUSHMESH_PORT_80_TCP",
            "PUSHMESH_PORT_6001_TCP_PROTO",
            "PUSHMESH_PORT_6001_TCP_PORT",
            "PUSHMESH_PORT_6001_TCP_ADDR",
            "PUSHMESH_PORT_7000_UDP",
            "PUSHMESH_PEERS_SERVICE_HOST",
            "PUSHMESH_PEERS_SERVICE_PORT",
            "PUSHMESH_PEERS_PORT",
            "PUSHMESH_PEERS_PORT_7000_UDP_ADDR",
            "PUSHMESH_CLUSTER_SERVICE_HOST",
            "PUSHMESH_CLUSTER_PORT",
            "PUSHMESH_HEADLESS_2_PORT_7001_UDP",
        ];
        for l in links {
            assert!(is_service_link(l), "{l}");
        }
        assert!(report(&links).is_empty(), "{}", report(&links));
    }

    #[test]
    fn near_misses_of_service_links_are_not_links() {
        for n in [
            "PUSHMESH_SERVICE",
            "PUSHMESH_SERVICE_HOSTS",
            "PUSHMESH_SERVICE_PORT_",
            "PUSHMESH_PORTS",
            "PUSHMESH_PORT_X_TCP",
            "PUSHMESH_PORT_80_HTTP",
            "PUSHMESH_PORT_80_TCP_HOST",
            "PUSHMESH__PORT",
            "PUSHMESH_peers_PORT",
        ] {
            assert!(!is_service_link(n), "{n}");
        }
    }

    #[test]
    fn typos_name_the_closest_known_variable() {
        let r = report(&[
            "PUSHMESH_LISTN",
            "PUSHMESH_SEED",
            "PUSHMESH_APP",
            "PUSHMESH_LGO",
            "PUSHMESH_CLUSTER_SECERT",
            "pushmesh_listen",
            "PUSHMESH_GOSIP_LISTEN",
        ]);
        let got: Vec<(&str, &str)> = r.typos.iter().map(|(n, k)| (n.as_str(), *k)).collect();
        assert_eq!(
            got,
            vec![
                ("PUSHMESH_APP", "PUSHMESH_APPS"),
                ("PUSHMESH_CLUSTER_SECERT", "PUSHMESH_CLUSTER_SECRET"),
                ("PUSHMESH_GOSIP_LISTEN", "PUSHMESH_GOSSIP_LISTEN"),
                ("PUSHMESH_LGO", "PUSHMESH_LOG"),
                ("PUSHMESH_LISTN", "PUSHMESH_LISTEN"),
                ("PUSHMESH_SEED", "PUSHMESH_SEEDS"),
                ("pushmesh_listen", "PUSHMESH_LISTEN"),
            ]
        );
        assert!(r.unknown.is_empty());
        let text = r.to_string();
        assert!(
            text.contains("PUSHMESH_LISTN ignored: did you mean PUSHMESH_LISTEN?"),
            "{text}"
        );
    }

    #[test]
    fn other_unknown_variables_are_listed_once() {
        let r = report(&["PUSHMESH_BIN", "PUSHMESH_WHATEVER", "PUSHMESH_BIN"]);
        assert!(r.typos.is_empty());
        assert_eq!(r.unknown, vec!["PUSHMESH_BIN", "PUSHMESH_WHATEVER"]);
        assert_eq!(
            r.to_string(),
            "unknown environment variables ignored: PUSHMESH_BIN, PUSHMESH_WHATEVER\n"
        );
    }

    #[test]
    fn distance_counts_edits() {
        assert_eq!(distance("LISTEN", "LISTEN"), 0);
        assert_eq!(distance("LISTN", "LISTEN"), 1);
        assert_eq!(distance("LSITEN", "LISTEN"), 1);
        assert_eq!(distance("", "LOG"), 3);
        assert_eq!(distance("BIN", "LOG"), 3);
        assert_eq!(closest_known("PUSHMESH_BIN"), None);
        assert_eq!(closest_known("PUSHMESH_"), None);
    }
}

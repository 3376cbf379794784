//! Strict loading of values: URLs, seeds, origins and header names are
//! parsed at start, and a bad one stops the node (exit 2) with an error
//! naming the key, rather than a node that starts and fails later (a
//! webhook retried silently, a seed never reached).

use reqwest::Url;

use super::{AppIo, ConfigError};
use pushmesh_core::AppConfig;

/// Why a value does not parse, with the key it came from.
fn bad(key: String, value: &str, why: &str) -> ConfigError {
    ConfigError::Value {
        key,
        value: value.to_owned(),
        why: why.to_owned(),
    }
}

/// An `http://` or `https://` URL with a host.
pub(super) fn http_url(key: String, value: &str) -> Result<(), ConfigError> {
    let url =
        Url::parse(value).map_err(|e| bad(key.clone(), value, &format!("is not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad(key, value, "must be an http:// or https:// URL"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad(key, value, "has no host"));
    }
    Ok(())
}

/// `*`, `null`, or an origin as browsers send it: `scheme://host[:port]`
/// with nothing after it (an allow-list entry with a path never matches).
fn origin(key: String, value: &str) -> Result<(), ConfigError> {
    if value == "*" || value == "null" {
        return Ok(());
    }
    let url = Url::parse(value).map_err(|e| bad(key.clone(), value, &e.to_string()))?;
    let serialized = url.origin().ascii_serialization();
    if serialized.eq_ignore_ascii_case(value) {
        Ok(())
    } else {
        Err(bad(
            key,
            value,
            &format!(
                "is not an origin (scheme://host[:port], no path): did you mean {serialized:?}?"
            ),
        ))
    }
}

/// `HOST:PORT` with a port number (a host name is resolved later, again
/// and again: it may not exist yet).
pub(super) fn seed(key: String, value: &str) -> Result<(), ConfigError> {
    let Some((host, port)) = value.rsplit_once(':') else {
        return Err(bad(key, value, "must be HOST:PORT"));
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(bad(key, value, "must be HOST:PORT with a host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(bad(key, value, "has no valid port (1-65535)")),
    }
}

/// Every URL, origin and header name of the apps' I/O settings.
pub(super) fn app_values(apps: &[AppConfig], io: &[AppIo]) -> Result<(), ConfigError> {
    for (a, io) in apps.iter().zip(io) {
        let at = |k: &str| format!("apps[id={:?}].{k}", a.id);
        if let Some(z) = &io.authorizer {
            http_url(at("authorizer.url"), &z.url)?;
            if let Some(c) = z
                .commands
                .iter()
                .find(|c| !super::app_io::all_commands().contains(c))
            {
                return Err(ConfigError::Invalid(format!(
                    "app {:?}: unknown authorizer command {c:?}",
                    a.id
                )));
            }
        }
        for (i, w) in io.webhooks.iter().enumerate() {
            http_url(at(&format!("webhooks[{i}].url")), &w.url)?;
            for (name, v) in &w.headers {
                let key = at(&format!("webhooks[{i}].headers"));
                reqwest::header::HeaderName::try_from(name.as_str())
                    .map_err(|_| bad(key.clone(), name, "is not a header name"))?;
                reqwest::header::HeaderValue::try_from(v.as_str())
                    .map_err(|_| bad(key, name, "has a value that is not a header value"))?;
            }
        }
        for o in &io.allowed_origins {
            origin(at("allowed_origins"), o)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let k = || "k".to_string();
        assert!(http_url(k(), "https://example.com/hooks").is_ok());
        assert!(http_url(k(), "http://127.0.0.1:8080/a").is_ok());
        for bad in [
            "not a url",
            "ftp://example.com",
            "https://",
            "example.com/x",
            "",
        ] {
            let e = http_url(k(), bad).expect_err(bad).to_string();
            assert!(e.contains("k"), "{e}");
        }
    }

    #[test]
    fn origins() {
        let k = || "k".to_string();
        for ok in ["*", "null", "https://example.com", "http://localhost:3000"] {
            assert!(origin(k(), ok).is_ok(), "{ok}");
        }
        let e = origin(k(), "https://example.com/")
            .expect_err("path")
            .to_string();
        assert!(e.contains("did you mean \"https://example.com\""), "{e}");
        assert!(origin(k(), "example.com").is_err());
    }

    #[test]
    fn seeds() {
        let k = || "k".to_string();
        for ok in ["10.0.0.1:7000", "pushmesh-0.pushmesh:7000", "[::1]:7000"] {
            assert!(seed(k(), ok).is_ok(), "{ok}");
        }
        for bad in ["10.0.0.1", ":7000", "host:0", "host:99999", "host:x"] {
            assert!(seed(k(), bad).is_err(), "{bad}");
        }
    }
}

//! HMAC-SHA256 signatures of the Pusher protocol (spec §6, §7), compared in
//! constant time.

use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// How far an HTTP API request's `auth_timestamp` may be from now, in seconds.
pub const API_TIMESTAMP_WINDOW_SECS: i64 = 600;

fn mac(secret: &str) -> HmacSha256 {
    // HMAC takes keys of any length; this cannot fail.
    match HmacSha256::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => unreachable!("hmac accepts keys of any length"),
    }
}

/// Lowercase hex HMAC-SHA256 of `message` under `secret`.
pub fn sign(secret: &str, message: &str) -> String {
    let mut m = mac(secret);
    m.update(message.as_bytes());
    hex::encode(m.finalize().into_bytes())
}

/// Checks a hex signature in constant time.
pub fn verify(secret: &str, message: &[u8], signature_hex: &str) -> bool {
    let Ok(sig) = hex::decode(signature_hex) else {
        return false;
    };
    let mut m = mac(secret);
    m.update(message);
    m.verify_slice(&sig).is_ok()
}

/// Compares two secrets in constant time (for equal lengths).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// The string signed for a private or encrypted channel.
pub fn channel_string(socket_id: &str, channel: &str) -> String {
    format!("{socket_id}:{channel}")
}

/// The string signed for a presence channel (`channel_data` exactly as sent).
pub fn presence_string(socket_id: &str, channel: &str, channel_data: &str) -> String {
    format!("{socket_id}:{channel}:{channel_data}")
}

/// The string signed for a user sign-in (`user_data` exactly as sent).
pub fn signin_string(socket_id: &str, user_data: &str) -> String {
    format!("{socket_id}::user::{user_data}")
}

/// Why a client `auth` value is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Not of the form `key:signature`.
    #[error("auth must be of the form <app_key>:<signature>")]
    Malformed,
    /// The key is not this app's.
    #[error("auth key does not match the app key")]
    WrongKey,
    /// The signature does not match.
    #[error("invalid signature")]
    BadSignature,
}

/// Checks a client `auth` value (`"<app_key>:<hex signature>"`) for `signed`.
pub fn verify_client_auth(
    app_key: &str,
    secret: &str,
    auth: &str,
    signed: &str,
) -> Result<(), AuthError> {
    let (key, sig) = auth.split_once(':').ok_or(AuthError::Malformed)?;
    // The key is public; the signature check is the one that must be constant-time.
    if key != app_key {
        return Err(AuthError::WrongKey);
    }
    if verify(secret, signed.as_bytes(), sig) {
        Ok(())
    } else {
        Err(AuthError::BadSignature)
    }
}

/// Lowercase hex MD5 of an HTTP body.
pub fn body_md5(body: &[u8]) -> String {
    hex::encode(Md5::digest(body))
}

/// Why a signed HTTP API request is refused (all map to 401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiAuthError {
    /// A required auth parameter is missing.
    #[error("missing query parameter {0}")]
    Missing(&'static str),
    /// `auth_key` is not the app's key.
    #[error("auth_key does not match the app")]
    WrongKey,
    /// `auth_version` is not 1.0.
    #[error("unsupported auth_version, expected 1.0")]
    Version,
    /// `auth_timestamp` is not an integer.
    #[error("auth_timestamp is not a number")]
    BadTimestamp,
    /// `auth_timestamp` is too far from now.
    #[error("auth_timestamp is more than {API_TIMESTAMP_WINDOW_SECS} s from the server's time")]
    StaleTimestamp,
    /// `body_md5` does not match the body.
    #[error("body_md5 does not match the body")]
    BodyMd5,
    /// The signature does not match.
    #[error("invalid signature")]
    BadSignature,
}

/// The string signed for an HTTP API request: `METHOD\nPATH\n<sorted query>`,
/// where the query is every parameter but `auth_signature`, keys lowercased,
/// sorted, joined as `k=v` with `&`, values not escaped.
pub fn api_string_to_sign(method: &str, path: &str, query: &[(String, String)]) -> String {
    let mut params: Vec<(String, &str)> = query
        .iter()
        .filter(|(k, _)| k != "auth_signature")
        .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str()))
        .collect();
    params.sort();
    let mut out = String::with_capacity(64 + path.len() + params.len() * 24);
    out.push_str(&method.to_ascii_uppercase());
    out.push('\n');
    out.push_str(path);
    out.push('\n');
    for (i, (k, v)) in params.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    out
}

/// Verifies a signed HTTP API request. `query` holds the decoded query
/// parameters; `now_unix` is the server's time in seconds.
pub fn verify_api_request(
    method: &str,
    path: &str,
    query: &[(String, String)],
    body: &[u8],
    app_key: &str,
    secret: &str,
    now_unix: i64,
) -> Result<(), ApiAuthError> {
    let get = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let key = get("auth_key").ok_or(ApiAuthError::Missing("auth_key"))?;
    let ts = get("auth_timestamp").ok_or(ApiAuthError::Missing("auth_timestamp"))?;
    let version = get("auth_version").ok_or(ApiAuthError::Missing("auth_version"))?;
    let sig = get("auth_signature").ok_or(ApiAuthError::Missing("auth_signature"))?;
    if key != app_key {
        return Err(ApiAuthError::WrongKey);
    }
    if version != "1.0" {
        return Err(ApiAuthError::Version);
    }
    let ts: i64 = ts.parse().map_err(|_| ApiAuthError::BadTimestamp)?;
    // `abs_diff`: a timestamp near i64::MIN/MAX must not overflow (found by
    // fuzzing: in a release build the wrapped difference passed the check).
    if now_unix.abs_diff(ts) > API_TIMESTAMP_WINDOW_SECS.unsigned_abs() {
        return Err(ApiAuthError::StaleTimestamp);
    }
    if !body.is_empty() {
        let md5 = get("body_md5").ok_or(ApiAuthError::Missing("body_md5"))?;
        if !md5.eq_ignore_ascii_case(&body_md5(body)) {
            return Err(ApiAuthError::BodyMd5);
        }
    }
    let signed = api_string_to_sign(method, path, query);
    if verify(secret, signed.as_bytes(), sig) {
        Ok(())
    } else {
        Err(ApiAuthError::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extreme_timestamps_are_stale_not_overflows() {
        for ts in [i64::MIN, i64::MIN + 1, i64::MAX, -1_000_000_000_000] {
            let query = vec![
                ("auth_key".to_string(), "key".to_string()),
                ("auth_timestamp".to_string(), ts.to_string()),
                ("auth_version".to_string(), "1.0".to_string()),
                ("auth_signature".to_string(), "00".to_string()),
            ];
            let r = verify_api_request(
                "GET",
                "/apps/1/channels",
                &query,
                b"",
                "key",
                "secret",
                1_700_000_000,
            );
            assert_eq!(r, Err(ApiAuthError::StaleTimestamp), "timestamp {ts}");
        }
    }

    const KEY: &str = "278d425bdf160c739803";
    const SECRET: &str = "7ad3773142a6692b25b8";
    const SOCKET: &str = "1234.1234";

    #[test]
    fn private_channel_vector() {
        let s = sign(SECRET, &channel_string(SOCKET, "private-foobar"));
        assert_eq!(
            s,
            "58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
        );
        let auth = format!("{KEY}:{s}");
        assert_eq!(
            verify_client_auth(
                KEY,
                SECRET,
                &auth,
                &channel_string(SOCKET, "private-foobar")
            ),
            Ok(())
        );
        assert_eq!(
            verify_client_auth(KEY, SECRET, &auth, &channel_string(SOCKET, "private-other")),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            verify_client_auth("other", SECRET, &auth, "x"),
            Err(AuthError::WrongKey)
        );
        assert_eq!(
            verify_client_auth(KEY, SECRET, "nocolon", "x"),
            Err(AuthError::Malformed)
        );
    }

    #[test]
    fn signin_vector() {
        assert_eq!(
            sign(SECRET, &signin_string(SOCKET, r#"{"id":"12345"}"#)),
            "4708d583dada6a56435fb8bc611c77c359a31eebde13337c16ab43aa6de336ba"
        );
    }

    #[test]
    fn presence_vector() {
        let data = r#"{"user_id":10,"user_info":{"name":"Mr. Channels"}}"#;
        assert_eq!(
            sign(SECRET, &presence_string(SOCKET, "presence-foobar", data)),
            "31935e7d86dba64c2a90aed31fdc61869f9b22ba9d8863bba239c03ca481bc80"
        );
    }

    fn vector_query(ts: &str) -> Vec<(String, String)> {
        vec![
            ("auth_key".into(), KEY.into()),
            ("auth_timestamp".into(), ts.into()),
            ("auth_version".into(), "1.0".into()),
            ("body_md5".into(), "ec365a775a4cd0599faeb73354201b6f".into()),
        ]
    }

    const BODY: &str = r#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;

    #[test]
    fn http_api_vector() {
        assert_eq!(
            body_md5(BODY.as_bytes()),
            "ec365a775a4cd0599faeb73354201b6f"
        );
        let mut q = vector_query("1353088179");
        let s = sign(SECRET, &api_string_to_sign("POST", "/apps/3/events", &q));
        assert_eq!(
            s,
            "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
        );
        q.push(("auth_signature".into(), s));
        let ok = verify_api_request(
            "POST",
            "/apps/3/events",
            &q,
            BODY.as_bytes(),
            KEY,
            SECRET,
            1353088179 + 599,
        );
        assert_eq!(ok, Ok(()));
        let stale = verify_api_request(
            "POST",
            "/apps/3/events",
            &q,
            BODY.as_bytes(),
            KEY,
            SECRET,
            1353088179 + 601,
        );
        assert_eq!(stale, Err(ApiAuthError::StaleTimestamp));
        let bad_body =
            verify_api_request("POST", "/apps/3/events", &q, b"{}", KEY, SECRET, 1353088179);
        assert_eq!(bad_body, Err(ApiAuthError::BodyMd5));
        let bad_path = verify_api_request(
            "POST",
            "/apps/4/events",
            &q,
            BODY.as_bytes(),
            KEY,
            SECRET,
            1353088179,
        );
        assert_eq!(bad_path, Err(ApiAuthError::BadSignature));
    }

    #[test]
    fn missing_and_garbage_signatures_are_refused() {
        let q = vector_query("1353088179");
        assert_eq!(
            verify_api_request(
                "POST",
                "/apps/3/events",
                &q,
                BODY.as_bytes(),
                KEY,
                SECRET,
                1353088179
            ),
            Err(ApiAuthError::Missing("auth_signature"))
        );
        assert!(!verify(SECRET, b"x", "zz-not-hex"));
        assert!(!verify(SECRET, b"x", ""));
    }
}

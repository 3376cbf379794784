//! `pushmesh apps list|get|create|update|delete|rotate-secret|stats`: the
//! admin API (`/admin/apps`) from a shell, for operators and scripts. Each
//! prints the API's JSON answer on stdout; a refusal prints its JSON body
//! on stderr and fails.

use serde_json::{Map, Value};

use crate::config::{AdminTarget, AppsCommand};

/// Why a command could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum AppsCliError {
    /// No token given.
    #[error("no admin token: give --token-file FILE or set PUSHMESH_ADMIN_TOKEN")]
    NoToken,
    /// The token file cannot be read.
    #[error("cannot read {0}: {1}")]
    TokenFile(String, std::io::Error),
    /// A `--set` that is not FIELD=JSON.
    #[error("--set {0:?}: expected FIELD=JSON (a string value needs quotes: name=\"\\\"x\\\"\", or is taken as a string when it is not JSON)")]
    Set(String),
    /// The request failed.
    #[error("cannot reach the admin API: {0}")]
    Http(#[from] reqwest::Error),
    /// The API refused (status and body).
    #[error("HTTP {0}: {1}")]
    Refused(u16, String),
}

fn fields(set: &[String]) -> Result<Map<String, Value>, AppsCliError> {
    let mut m = Map::new();
    for s in set {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| AppsCliError::Set(s.clone()))?;
        if k.is_empty() {
            return Err(AppsCliError::Set(s.clone()));
        }
        // Not JSON: a bare string (`wsify_event=message`).
        let v = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_owned()));
        m.insert(k.to_owned(), v);
    }
    Ok(m)
}

/// Runs one command; returns the answer's JSON (none for a 204).
pub async fn run(target: &AdminTarget, cmd: &AppsCommand) -> Result<Option<Value>, AppsCliError> {
    let token = match &target.token_file {
        Some(f) => std::fs::read_to_string(f)
            .map_err(|e| AppsCliError::TokenFile(f.display().to_string(), e))?
            .trim()
            .to_owned(),
        None => std::env::var("PUSHMESH_ADMIN_TOKEN").map_err(|_| AppsCliError::NoToken)?,
    };
    let base = target.url.trim_end_matches('/');
    let http = reqwest::Client::new();
    let url = |p: &str| format!("{base}/admin/apps{p}");
    let req = match cmd {
        AppsCommand::List => http.get(url("")),
        AppsCommand::Get { id } => http.get(url(&format!("/{id}"))),
        AppsCommand::Stats { id } => http.get(url(&format!("/{id}/stats"))),
        AppsCommand::Create {
            id,
            key,
            secret,
            set,
        } => {
            let mut m = fields(set)?;
            m.insert("id".into(), Value::from(id.as_str()));
            m.insert("key".into(), Value::from(key.as_str()));
            if let Some(s) = secret {
                m.insert("secret".into(), Value::from(s.as_str()));
            }
            http.post(url("")).json(&Value::Object(m))
        }
        AppsCommand::Update { id, set } => http
            .patch(url(&format!("/{id}")))
            .json(&Value::Object(fields(set)?)),
        AppsCommand::Delete { id } => http.delete(url(&format!("/{id}"))),
        AppsCommand::RotateSecret { id, grace_secs } => {
            let mut m = Map::new();
            if let Some(g) = grace_secs {
                m.insert("grace_secs".into(), Value::from(*g));
            }
            http.post(url(&format!("/{id}/secret")))
                .json(&Value::Object(m))
        }
    };
    let resp = req.bearer_auth(token).send().await?;
    let status = resp.status();
    let body = resp.text().await?;
    if !status.is_success() {
        return Err(AppsCliError::Refused(status.as_u16(), body));
    }
    if body.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_takes_json_or_a_bare_string() {
        let m = fields(&[
            "enabled=false".into(),
            "wsify_event=message".into(),
            "limits={\"max_event_channels\":5}".into(),
        ])
        .expect("fields");
        assert_eq!(m["enabled"], Value::Bool(false));
        assert_eq!(m["wsify_event"], Value::from("message"));
        assert_eq!(m["limits"]["max_event_channels"], Value::from(5));
        assert!(fields(&["novalue".into()]).is_err());
        assert!(fields(&["=1".into()]).is_err());
    }
}

//! SIGHUP: reload what can be reloaded, never stop.
//!
//! The handler is installed before the node binds anything (see the binary's
//! `serve`), so a SIGHUP at any moment of a node's life is handled: without a
//! handler the signal's default action would end the process (exit 129).
//! The TLS certificate and key, and the configuration file's apps (added,
//! changed, removed: `apps::reload_config`, with the admin API's effect on
//! open connections) are what can be reloaded; every reload logs what it
//! did.

use std::sync::Arc;

use crate::tls::Reloadable;

/// What one reload did, for the log line and the tests.
#[derive(Debug)]
pub enum Outcome {
    /// Nothing on this node can be reloaded (no TLS).
    Nothing,
    /// The certificate was reloaded.
    Certificate,
    /// The certificate could not be loaded; the old one stays.
    CertificateFailed(crate::tls::TlsError),
}

/// Reloads everything reloadable once and logs the outcome.
pub fn reload(tls: Option<&Reloadable>) -> Outcome {
    let outcome = match tls {
        None => Outcome::Nothing,
        Some(t) => match t.reload() {
            Ok(()) => Outcome::Certificate,
            Err(e) => Outcome::CertificateFailed(e),
        },
    };
    match &outcome {
        Outcome::Nothing => {
            tracing::info!(
                "SIGHUP: no TLS certificate to reload (no TLS configured); the node keeps running"
            )
        }
        Outcome::Certificate => tracing::info!("SIGHUP: TLS certificate and key reloaded"),
        Outcome::CertificateFailed(e) => {
            tracing::error!(error = %e, "SIGHUP: TLS certificate reload failed, keeping the old one")
        }
    }
    outcome
}

/// The SIGHUP stream, installed now (call it before binding).
#[cfg(unix)]
pub fn install() -> std::io::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
}

/// Reads the configuration file's apps again and serves them; logs it.
pub async fn reload_apps(st: &crate::Shared) {
    if st.config.apps_file.is_none() {
        tracing::info!(
            "SIGHUP: apps not reloaded: they come from --app or are the development app"
        );
        return;
    }
    match crate::apps::reload_config(st).await {
        Ok(n) => tracing::info!(
            apps = n,
            "SIGHUP: apps reloaded from the configuration file"
        ),
        Err(e) => tracing::error!(error = %e, "SIGHUP: apps not reloaded, keeping the old ones"),
    }
}

/// Reloads on every SIGHUP of `hup`, for the life of the process.
#[cfg(unix)]
pub fn spawn(
    mut hup: tokio::signal::unix::Signal,
    tls: Option<Arc<Reloadable>>,
    st: Arc<crate::Shared>,
) {
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            reload(tls.as_deref());
            reload_apps(&st).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_tls_there_is_nothing_to_reload() {
        assert!(matches!(reload(None), Outcome::Nothing));
    }

    #[test]
    fn a_missing_certificate_keeps_the_old_one() {
        let dir = std::env::temp_dir().join(format!("pm-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let cert = dir.join("c.pem");
        let key = dir.join("k.pem");
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        std::fs::write(&cert, ck.cert.pem()).expect("write");
        std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write");
        let t = Reloadable::new(cert.clone(), key.clone()).expect("loads");
        assert!(matches!(reload(Some(&t)), Outcome::Certificate));
        std::fs::remove_file(&cert).expect("rm");
        assert!(matches!(reload(Some(&t)), Outcome::CertificateFailed(_)));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

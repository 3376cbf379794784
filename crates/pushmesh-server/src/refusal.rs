//! Refusing a connection with an answer instead of a reset.
//!
//! A connection refused at admission (its address holds too many) is
//! answered at once, before its request is read, with a complete HTTP
//! response (`Connection: close`, `Retry-After`, a JSON body) and a FIN.
//! Then whatever the client still sends is read and dropped until it closes
//! or [`LINGER`] has passed: closing a socket with unread input makes the
//! kernel send a reset, and the client could lose the answer with it.

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout_at, Instant};

/// Longest a refused connection is read from after its answer.
pub const LINGER: Duration = Duration::from_secs(1);

/// Time the answer itself has to be written.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// An answer to a refused connection.
#[derive(Debug, Clone, Copy)]
pub struct Refusal {
    /// 429 or 503.
    pub status: StatusCode,
    /// Seconds the client should wait before trying again.
    pub retry_after: u32,
    /// The machine-readable reason, as in the metrics.
    pub reason: &'static str,
    /// The message.
    pub message: &'static str,
}

impl Refusal {
    /// The whole HTTP/1.1 response.
    pub fn to_http(&self) -> Vec<u8> {
        let body = json!({ "error": self.message, "reason": self.reason }).to_string();
        format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             retry-after: {}\r\nconnection: close\r\n\r\n{body}",
            self.status.as_u16(),
            self.status.canonical_reason().unwrap_or(""),
            body.len(),
            self.retry_after,
        )
        .into_bytes()
    }
}

/// Writes `refusal` to `io`, shuts it down and reads until the client
/// closes, for at most `linger`.
pub async fn answer<S>(mut io: S, refusal: Refusal, linger: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let written = tokio::time::timeout(WRITE_TIMEOUT, async {
        io.write_all(&refusal.to_http()).await?;
        io.flush().await?;
        io.shutdown().await
    })
    .await;
    if !matches!(written, Ok(Ok(()))) {
        return;
    }
    let deadline = Instant::now() + linger;
    let mut buf = [0u8; 2048];
    while let Ok(Ok(n)) = timeout_at(deadline, io.read(&mut buf)).await {
        if n == 0 {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refusal_is_a_whole_response_then_eof() {
        let (mut client, server) = tokio::io::duplex(4096);
        let refusal = Refusal {
            status: StatusCode::TOO_MANY_REQUESTS,
            retry_after: 1,
            reason: "pending_per_ip",
            message: "too many handshakes from this address",
        };
        let task = tokio::spawn(answer(server, refusal, Duration::from_secs(5)));
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut got = String::new();
        client
            .read_to_string(&mut got)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            got.starts_with("HTTP/1.1 429 Too Many Requests\r\n"),
            "{got}"
        );
        assert!(got.contains("\r\nretry-after: 1\r\n"), "{got}");
        let body = got.split("\r\n\r\n").nth(1).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v["reason"], "pending_per_ip");
        assert!(got.contains(&format!("content-length: {}\r\n", body.len())));
        drop(client);
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .unwrap_or_else(|e| panic!("linger ends at the client's close: {e}"))
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

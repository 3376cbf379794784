//! The WebSocket edge with real sockets: a client that stops reading is
//! disconnected (4100) without slowing the others.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use pushmesh_core::PublishRequest;
use pushmesh_server::config::{development_app, Config};
use pushmesh_server::Server;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_text(ws: &mut Ws) -> String {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return t.to_string(),
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

async fn subscribe(ws: &mut Ws, channel: &str) {
    use futures_util::SinkExt;
    let established = next_text(ws).await;
    assert!(established.contains("pusher:connection_established"));
    let sub = format!(r#"{{"event":"pusher:subscribe","data":{{"channel":"{channel}"}}}}"#);
    ws.send(Message::Text(sub.into()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let ok = next_text(ws).await;
    assert!(ok.contains("subscription_succeeded"), "{ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_closed_and_others_get_everything() {
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}")),
        apps: vec![development_app()],
        outbound_queue: 16,
        ..Config::default()
    };
    let server = Server::bind(config).await.unwrap_or_else(|e| panic!("{e}"));
    let addr = server.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let shared = server.shared();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async {
        let _ = stop_rx.await;
    }));
    let url = format!("ws://{addr}/app/app-key?protocol=7");
    let (mut slow, _) = tokio_tungstenite::connect_async(&url)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (mut fast, _) = tokio_tungstenite::connect_async(&url)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    subscribe(&mut slow, "firehose").await;
    subscribe(&mut fast, "firehose").await;

    const N: usize = 1500;
    // The publisher stays at most a few messages ahead of the fast reader
    // (it waits on the reader's progress, no sleeps), so only the client
    // that does not read at all can fall behind.
    let progress = std::sync::Arc::new((
        std::sync::atomic::AtomicUsize::new(0),
        tokio::sync::Notify::new(),
    ));
    let p2 = progress.clone();
    let reader = tokio::spawn(async move {
        let mut got = 0usize;
        while got < N {
            let t = next_text(&mut fast).await;
            if t.contains("\"event\":\"big\"") {
                got += 1;
                p2.0.store(got, Ordering::Release);
                p2.1.notify_one();
            }
        }
        got
    });
    // 1500 x 8 KiB = 12 MiB: far more than the slow client's socket buffers.
    let data = "x".repeat(8 * 1024);
    let channels = vec!["firehose".to_string()];
    for i in 0..N {
        while progress.0.load(Ordering::Acquire) + 8 < i {
            tokio::time::timeout(Duration::from_secs(10), progress.1.notified())
                .await
                .unwrap_or_else(|e| panic!("fast reader stalled: {e}"));
        }
        let r = shared
            .node
            .publish(
                pushmesh_core::AppIdx(0),
                &PublishRequest {
                    name: "big",
                    data: &data,
                    channels: &channels,
                    exclude_socket: None,
                },
                false,
                None,
            )
            .await;
        assert!(r.is_ok());
    }
    let got = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got, N, "the fast client got every message");
    assert_eq!(
        shared
            .node
            .links
            .stats
            .slow_consumers
            .load(Ordering::Relaxed),
        1,
        "the slow client was cut off"
    );

    // The slow client, reading at last, finds its connection closed.
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match slow.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .unwrap_or_else(|e| panic!("slow connection still open: {e}"));
    if let Some(code) = ended {
        assert_eq!(code, 4100);
    }
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(20), serving).await;
}

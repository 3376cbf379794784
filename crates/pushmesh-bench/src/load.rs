//! Scenarios: fanout, channels, connections, cluster.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use pushmesh_protocol::sign;
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;

use crate::procstat;
pub use crate::report::{table, Percentiles, Report};

use crate::client::Client;

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Where the server is and how to talk to it.
#[derive(Debug, Clone)]
pub struct Target {
    /// Host (IP) of the WebSocket / API port.
    pub host: String,
    /// Port.
    pub port: u16,
    /// App id.
    pub app_id: String,
    /// App key.
    pub key: String,
    /// App secret.
    pub secret: String,
    /// The server's pid, for CPU time and RSS.
    pub pid: Option<u32>,
}

/// How to load it.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Subscribers.
    pub subscribers: usize,
    /// Subscribers per channel (fanout: all on one).
    pub group: usize,
    /// Publishes per second; 0: as fast as accepted.
    pub rate: u64,
    /// How long to publish.
    pub duration: Duration,
    /// Payload padding, bytes.
    pub payload: usize,
    /// Loopback source addresses to spread client sockets over (127.0.0.x).
    pub source_addrs: u8,
    /// Print progress to stderr.
    pub progress: bool,
    /// Added to the embedded send time (tests: proves latency comes from it).
    pub ts_offset_us: i64,
    /// Publish through this target instead (cluster scenario).
    pub publish_via: Option<Target>,
    /// How long to wait for outstanding deliveries after publishing.
    pub drain: Duration,
    /// WebSocket handshakes in flight at once while setting up clients.
    pub connect_concurrency: usize,
    /// Distinct subscription filters (pushmesh extension; 0: none).
    /// Subscriber `i` asks for `{"k<i % filters>": "v"}` and every event
    /// carries all `k0..k<filters-1>` tags, so every subscriber still gets
    /// every event: the cost measured is the filters' evaluation.
    pub filters: usize,
    /// Subscribers negotiate permessage-deflate (the server must agree).
    pub compression: bool,
    /// Subscribers are Server-Sent Events streams (`/app/{key}/sse`)
    /// instead of WebSockets (pushmesh only).
    pub sse: bool,
    /// Events carry a realistic ~2 KB JSON order (a dozen line items)
    /// instead of `payload` bytes of padding.
    pub json_order: bool,
}

/// The filter of subscriber `i`, as JSON, if filters are on.
fn filter_of(i: usize, filters: usize) -> Option<String> {
    (filters > 0).then(|| format!(r#"{{"k{}":"v"}}"#, i % filters))
}

/// The tags every event carries when filters are on.
fn tags(filters: usize) -> Option<serde_json::Value> {
    (filters > 0).then(|| {
        (0..filters)
            .map(|k| (format!("k{k}"), serde_json::Value::from("v")))
            .collect::<serde_json::Map<_, _>>()
            .into()
    })
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Pulls `seq` and `ts` out of a delivered frame (data double-encoded or not).
pub fn parse_event(text: &str) -> Option<(u64, i64)> {
    fn num_after<'a>(text: &'a str, key: &str) -> Option<&'a str> {
        let i = text.find(key)? + key.len();
        let rest = text[i..].trim_start_matches(['\\', '"', ':']);
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '-'))
            .unwrap_or(rest.len());
        Some(&rest[..end])
    }
    let seq = num_after(text, "seq")?.parse().ok()?;
    let ts = num_after(text, "\"ts")
        .or_else(|| num_after(text, "\\\"ts"))?
        .parse()
        .ok()?;
    Some((seq, ts))
}

fn src_ip(i: usize, n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % n.max(1) as usize) as u8))
}

async fn tcp_connect(
    t: &Target,
    src: IpAddr,
) -> anyhow::Result<(tokio::net::TcpStream, SocketAddr)> {
    let addr: SocketAddr = format!("{}:{}", t.host, t.port)
        .parse()
        .context("bad host:port")?;
    let sock = TcpSocket::new_v4()?;
    if addr.ip().is_loopback() {
        sock.bind(SocketAddr::new(src, 0))?;
    }
    let stream = sock.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok((stream, addr))
}

fn app_path(t: &Target) -> String {
    format!("/app/{}?protocol=7&client=pushmesh-bench&version=1", t.key)
}

async fn ws_connect(t: &Target, src: IpAddr) -> anyhow::Result<Ws> {
    let (stream, addr) = tcp_connect(t, src).await?;
    let url = format!("ws://{addr}{}", app_path(t));
    let (ws, _) = tokio_tungstenite::client_async(url, stream).await?;
    Ok(ws)
}

async fn client_connect(t: &Target, src: IpAddr, compression: bool) -> anyhow::Result<Client> {
    let (stream, addr) = tcp_connect(t, src).await?;
    Client::connect(stream, addr, &app_path(t), compression).await
}

async fn client_text(ws: &mut Client) -> anyhow::Result<String> {
    match tokio::time::timeout(Duration::from_secs(15), ws.next_text()).await {
        Ok(Ok(Some(t))) => Ok(t),
        Ok(Ok(None)) => bail!("connection closed"),
        Ok(Err(e)) => Err(e),
        Err(_) => bail!("timed out waiting for the server"),
    }
}

async fn next_text(ws: &mut Ws) -> anyhow::Result<String> {
    loop {
        match tokio::time::timeout(Duration::from_secs(15), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return Ok(t.to_string()),
            Ok(Some(Ok(Message::Ping(p)))) => ws.send(Message::Pong(p)).await?,
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => bail!("websocket error: {e}"),
            Ok(None) => bail!("connection closed"),
            Err(_) => bail!("timed out waiting for the server"),
        }
    }
}

/// A subscribed client.
pub async fn subscribe(
    t: &Target,
    channel: &str,
    filter: Option<&str>,
    src: IpAddr,
    compression: bool,
    sse: bool,
) -> anyhow::Result<Client> {
    if sse {
        if filter.is_some() {
            bail!("--sse takes no --filters");
        }
        // Subscribed as the stream opens; `run_pubsub` waits for the
        // channel's subscription count (an SSE stream gets no
        // `subscription_succeeded` on a channel without history).
        let (stream, addr) = tcp_connect(t, src).await?;
        let path = format!("/app/{}/sse?channel={channel}", t.key);
        return Client::sse(stream, addr, &path).await;
    }
    let mut ws = client_connect(t, src, compression).await?;
    let first = client_text(&mut ws).await?;
    if !first.contains("connection_established") {
        bail!("unexpected first frame: {first}");
    }
    let sub = match filter {
        Some(f) => format!(
            r#"{{"event":"pusher:subscribe","data":{{"channel":"{channel}","filter":{f}}}}}"#
        ),
        None => format!(r#"{{"event":"pusher:subscribe","data":{{"channel":"{channel}"}}}}"#),
    };
    ws.send_text(&sub).await?;
    loop {
        let t = client_text(&mut ws).await?;
        if t.contains("subscription_succeeded") {
            return Ok(ws);
        }
        if t.contains("subscription_error") || t.contains("pusher:error") {
            bail!("subscription refused: {t}");
        }
    }
}

/// Opens and subscribes many clients, `connect_concurrency` handshakes at a time.
async fn subscribe_many(
    t: &Target,
    channels: Vec<String>,
    opts: &LoadOptions,
) -> anyhow::Result<Vec<Client>> {
    use futures_util::stream::{self, TryStreamExt};
    let n = channels.len();
    let done = AtomicU64::new(0);
    let progress = opts.progress;
    let source_addrs = opts.source_addrs;
    let concurrency = opts.connect_concurrency.max(1);
    let filters = opts.filters;
    let compression = opts.compression;
    let sse = opts.sse;
    let done = &done;
    stream::iter(channels.into_iter().enumerate().map(Ok::<_, anyhow::Error>))
        .map_ok(|(i, ch)| async move {
            let filter = filter_of(i, filters);
            let ws = subscribe(
                t,
                &ch,
                filter.as_deref(),
                src_ip(i, source_addrs),
                compression,
                sse,
            )
            .await
            .with_context(|| format!("client {i}"))?;
            let k = done.fetch_add(1, Ordering::Relaxed) + 1;
            if progress && k.is_multiple_of(1000) {
                eprintln!("  {k} of {n} subscribed");
            }
            Ok::<_, anyhow::Error>((i, ws))
        })
        .try_buffer_unordered(concurrency)
        .try_collect::<Vec<_>>()
        .await
        .map(|mut v| {
            v.sort_by_key(|(i, _)| *i);
            v.into_iter().map(|(_, ws)| ws).collect()
        })
}

struct SubResult {
    hist: Histogram<u64>,
    received: u64,
    unique: u64,
    wire_bytes: u64,
}

/// One subscriber's receive loop: latency and a bitset of seen sequence numbers.
async fn receive(
    mut ws: Client,
    mut stop: tokio::sync::watch::Receiver<bool>,
    total: Arc<AtomicU64>,
    ts_offset: i64,
) -> SubResult {
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|_| unreachable!());
    let mut seen: Vec<u64> = Vec::new();
    let (mut received, mut unique) = (0u64, 0u64);
    loop {
        // No timer per message: the stop signal is a watch channel.
        let msg = tokio::select! {
            biased;
            _ = stop.changed() => break,
            m = ws.next_text() => match m {
                Ok(Some(m)) => m,
                _ => break,
            },
        };
        let text = msg;
        if !text.contains("\"bench\"") {
            continue;
        }
        let Some((seq, ts)) = parse_event(&text) else {
            continue;
        };
        let lat = (now_us() - ts + ts_offset).max(1) as u64;
        let _ = hist.record(lat.min(60_000_000));
        received += 1;
        total.fetch_add(1, Ordering::Relaxed);
        let (w, b) = ((seq / 64) as usize, seq % 64);
        if seen.len() <= w {
            seen.resize(w + 1, 0);
        }
        if seen[w] & (1 << b) == 0 {
            seen[w] |= 1 << b;
            unique += 1;
        }
    }
    ws.close().await;
    SubResult {
        hist,
        received,
        unique,
        wire_bytes: ws.wire_bytes,
    }
}

fn signed_url(t: &Target, path: &str, body: &str) -> String {
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let md5 = sign::body_md5(body.as_bytes());
    let q = format!(
        "auth_key={}&auth_timestamp={ts}&auth_version=1.0&body_md5={md5}",
        t.key
    );
    let sig = sign::sign(&t.secret, &format!("POST\n{path}\n{q}"));
    format!(
        "http://{}:{}{path}?{q}&auth_signature={sig}",
        t.host, t.port
    )
}

/// A realistic order of about 2 KB: a dozen line items, varied per event.
pub fn order_json(seq: u64) -> String {
    let items: Vec<serde_json::Value> = (0..12u64)
        .map(|i| {
            let k = seq.wrapping_mul(31).wrapping_add(i * 7919);
            serde_json::json!({
                "sku": format!("SKU-{:06}", k % 1_000_000),
                "name": format!("Item {} of the spring catalogue, size {}", k % 997, ["S", "M", "L", "XL"][(k % 4) as usize]),
                "qty": 1 + k % 5,
                "unit_price_cents": 499 + (k % 20_000),
                "currency": "EUR",
                "warehouse": format!("eu-west-{}", 1 + k % 3),
                "gift_wrap": k.is_multiple_of(7),
            })
        })
        .collect();
    serde_json::json!({
        "order_id": format!("ord_{:012x}", seq.wrapping_mul(0x9e37_79b9)),
        "status": "confirmed",
        "customer": {"id": format!("cus_{}", seq % 10_000), "email": format!("customer{}@example.com", seq % 10_000), "tier": "gold"},
        "shipping": {"method": "express", "address": {"city": "Lyon", "postcode": "69002", "country": "FR"}},
        "items": items,
        "total_cents": 10_000 + seq % 90_000,
    })
    .to_string()
}

/// Publishes `bench` events, round-robin over `channels`; returns (published per channel, HTTP latency).
async fn publish_loop(
    t: &Target,
    channels: &[String],
    opts: &LoadOptions,
) -> anyhow::Result<(Vec<u64>, Histogram<u64>, f64)> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut per_channel = vec![0u64; channels.len()];
    let path = format!("/apps/{}/events", t.app_id);
    let pad = "x".repeat(opts.payload);
    let start = Instant::now();
    let interval = (opts.rate > 0).then(|| Duration::from_secs_f64(1.0 / opts.rate as f64));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = tokio::task::JoinSet::new();
    let mut seq = 0u64;
    let mut last_progress = Instant::now();
    while start.elapsed() < opts.duration {
        if let Some(iv) = interval {
            let due = start + iv.mul_f64(seq as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        let ch = (seq as usize) % channels.len();
        let data = if opts.json_order {
            format!(
                r#"{{"seq":{seq},"ts":{},"order":{}}}"#,
                now_us() - opts.ts_offset_us,
                order_json(seq)
            )
        } else {
            format!(
                r#"{{"seq":{seq},"ts":{},"pad":"{pad}"}}"#,
                now_us() - opts.ts_offset_us
            )
        };
        let mut body = serde_json::json!({"name": "bench", "channel": channels[ch], "data": data});
        if let Some(tags) = tags(opts.filters) {
            body["tags"] = tags;
        }
        let body = body.to_string();
        let url = signed_url(t, &path, &body);
        let permit = in_flight.clone().acquire_owned().await?;
        let c = client.clone();
        tasks.spawn(async move {
            let _p = permit;
            let t0 = Instant::now();
            let ok = c
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            (ok, t0.elapsed().as_micros() as u64)
        });
        per_channel[ch] += 1;
        seq += 1;
        while let Some(r) = tasks.try_join_next() {
            if let Ok((ok, us)) = r {
                if ok {
                    let _ = hist.record(us.max(1));
                }
            }
        }
        if opts.progress && last_progress.elapsed() > Duration::from_secs(1) {
            eprintln!(
                "  published {seq} in {:.1} s",
                start.elapsed().as_secs_f64()
            );
            last_progress = Instant::now();
        }
    }
    while let Some(r) = tasks.join_next().await {
        if let Ok((ok, us)) = r {
            if ok {
                let _ = hist.record(us.max(1));
            } else {
                bail!("the server refused a publish");
            }
        }
    }
    Ok((per_channel, hist, start.elapsed().as_secs_f64()))
}

/// fanout (group = subscribers) and channels (group = K).
pub async fn run_pubsub(scenario: &str, t: &Target, opts: &LoadOptions) -> anyhow::Result<Report> {
    let group = opts.group.clamp(1, opts.subscribers.max(1));
    let nchan = opts.subscribers.div_ceil(group).max(1);
    let run = format!("{:x}", now_us() & 0xffffff);
    let channels: Vec<String> = (0..nchan).map(|c| format!("bench-{run}-{c}")).collect();
    if opts.progress {
        eprintln!(
            "{scenario}: {} subscribers on {nchan} channel(s)",
            opts.subscribers
        );
    }
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let total = Arc::new(AtomicU64::new(0));
    let sub_channel: Vec<usize> = (0..opts.subscribers).map(|i| i / group).collect();
    let names = sub_channel.iter().map(|c| channels[*c].clone()).collect();
    let subs: Vec<_> = subscribe_many(t, names, opts)
        .await?
        .into_iter()
        .map(|ws| tokio::spawn(receive(ws, stop.clone(), total.clone(), opts.ts_offset_us)))
        .collect();
    if opts.sse {
        wait_subscribed(t, &channels, &sub_channel).await?;
    }
    // Publishing through another node: its view of the subscribers arrives
    // over the cluster link; wait until it reports every channel occupied.
    if let Some(via) = &opts.publish_via {
        let deadline = Instant::now() + Duration::from_secs(10);
        for ch in &channels {
            while !channel_occupied(via, ch).await {
                if Instant::now() > deadline {
                    bail!("the publishing node never saw the subscribers (same cluster?)");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let cpu0 = t.pid.and_then(procstat::cpu_seconds);
    let via = opts.publish_via.as_ref().unwrap_or(t);
    let (per_channel, pub_hist, secs) = publish_loop(via, &channels, opts).await?;
    let expected: u64 = sub_channel.iter().map(|c| per_channel[*c]).sum();
    // Wait for the deliveries to arrive (bounded).
    let deadline = Instant::now() + opts.drain;
    while total.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu1 = t.pid.and_then(procstat::cpu_seconds);
    let _ = stop_tx.send(true);
    let mut lat = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut delivered, mut unique, mut wire) = (0u64, 0u64, 0u64);
    for s in subs {
        let r = s.await?;
        lat.add(&r.hist)?;
        delivered += r.received;
        unique += r.unique;
        wire += r.wire_bytes;
    }
    let cpu = cpu0.zip(cpu1).map(|(a, b)| b - a);
    Ok(Report {
        scenario: scenario.into(),
        subscribers: opts.subscribers,
        published: per_channel.iter().sum(),
        expected,
        delivered,
        lost: expected.saturating_sub(unique),
        duplicated: delivered - unique,
        seconds: secs,
        deliveries_per_sec: delivered as f64 / secs.max(1e-9),
        server_cpu_seconds: cpu,
        server_cpu_us_per_delivery: cpu.map(|c| c * 1e6 / delivered.max(1) as f64),
        publish_ms: Percentiles::of(&pub_hist),
        latency_ms: Percentiles::of(&lat),
        rss_kib_per_connection: None,
        hop_extra_ms: None,
        wire_bytes_per_delivery: Some(wire as f64 / delivered.max(1) as f64),
    })
}

/// connections: N idle subscribed connections, held; RSS per connection.
pub async fn run_connections(
    t: &Target,
    n: usize,
    hold: Duration,
    opts: &LoadOptions,
) -> anyhow::Result<Report> {
    let rss0 = t.pid.and_then(procstat::rss_kib);
    let start = Instant::now();
    let conns = subscribe_many(t, (0..n).map(|i| format!("idle-{i}")).collect(), opts).await?;
    tokio::time::sleep(hold).await;
    let rss1 = t.pid.and_then(procstat::rss_kib);
    let secs = start.elapsed().as_secs_f64();
    for mut c in conns {
        c.close().await;
    }
    Ok(Report {
        scenario: "connections".into(),
        subscribers: n,
        seconds: secs,
        rss_kib_per_connection: rss0
            .zip(rss1)
            .map(|(a, b)| (b as f64 - a as f64) / n.max(1) as f64),
        ..Report::default()
    })
}

/// cluster: subscribers on `t`, publishes through `t` then through `via`; the hop's extra latency.
pub async fn run_cluster(t: &Target, via: &Target, opts: &LoadOptions) -> anyhow::Result<Report> {
    let mut local_opts = opts.clone();
    local_opts.publish_via = None;
    let local = run_pubsub("cluster-local", t, &local_opts).await?;
    let mut remote_opts = opts.clone();
    remote_opts.publish_via = Some(via.clone());
    let mut remote = run_pubsub("cluster", t, &remote_opts).await?;
    remote.hop_extra_ms = Some((
        remote.latency_ms.p50 - local.latency_ms.p50,
        remote.latency_ms.p99 - local.latency_ms.p99,
    ));
    Ok(remote)
}

/// Whether `via` reports the channel occupied (signed `GET /channels/{c}`).
async fn channel_occupied(via: &Target, channel: &str) -> bool {
    let path = format!("/apps/{}/channels/{channel}", via.app_id);
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let q = format!("auth_key={}&auth_timestamp={ts}&auth_version=1.0", via.key);
    let sig = sign::sign(&via.secret, &format!("GET\n{path}\n{q}"));
    let url = format!(
        "http://{}:{}{path}?{q}&auth_signature={sig}",
        via.host, via.port
    );
    match reqwest::get(url).await {
        Ok(r) => r
            .text()
            .await
            .is_ok_and(|b| b.contains("\"occupied\":true")),
        Err(_) => false,
    }
}

/// A channel's `subscription_count` as the HTTP API reports it.
async fn subscription_count(t: &Target, channel: &str) -> Option<u64> {
    let path = format!("/apps/{}/channels/{channel}", t.app_id);
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let q = format!(
        "auth_key={}&auth_timestamp={ts}&auth_version=1.0&info=subscription_count",
        t.key
    );
    let sig = sign::sign(&t.secret, &format!("GET\n{path}\n{q}"));
    let url = format!(
        "http://{}:{}{path}?{q}&auth_signature={sig}",
        t.host, t.port
    );
    let body: serde_json::Value = reqwest::get(url).await.ok()?.json().await.ok()?;
    body.get("subscription_count")?.as_u64()
}

/// Waits (at most 60 s) until every channel counts its subscribers.
async fn wait_subscribed(
    t: &Target,
    channels: &[String],
    sub_channel: &[usize],
) -> anyhow::Result<()> {
    let mut want = vec![0u64; channels.len()];
    for c in sub_channel {
        want[*c] += 1;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for (ch, n) in channels.iter().zip(want) {
        while subscription_count(t, ch).await.unwrap_or(0) < n {
            if Instant::now() > deadline {
                bail!("{ch}: the streams were not all subscribed within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// Subscribes `channels` channels (`hold-<n>`) spread over `conns`
/// connections, frames pipelined, and waits for every confirmation.
/// Returns the connections (hold them to keep the interest).
pub async fn hold_channels(t: &Target, channels: usize, conns: usize) -> anyhow::Result<Vec<Ws>> {
    let conns = conns.max(1);
    let mut out = Vec::with_capacity(conns);
    for c in 0..conns {
        let mut ws = ws_connect(t, src_ip(c, 1)).await?;
        let first = next_text(&mut ws).await?;
        if !first.contains("connection_established") {
            bail!("unexpected first frame: {first}");
        }
        let mine: Vec<usize> = (c..channels).step_by(conns).collect();
        // A window of subscriptions in flight: the server's queue of
        // confirmations for this connection stays bounded.
        for chunk in mine.chunks(500) {
            for k in chunk {
                let sub =
                    format!(r#"{{"event":"pusher:subscribe","data":{{"channel":"hold-{k}"}}}}"#);
                ws.feed(Message::Text(sub.into())).await?;
            }
            ws.flush().await?;
            let mut ok = 0;
            while ok < chunk.len() {
                let t = next_text(&mut ws).await?;
                if t.contains("subscription_succeeded") {
                    ok += 1;
                } else if t.contains("subscription_error") || t.contains("pusher:error") {
                    bail!("subscription refused: {t}");
                }
            }
        }
        out.push(ws);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_double_encoded_and_plain() {
        assert_eq!(
            parse_event(
                r#"{"event":"bench","channel":"c","data":"{\"seq\":42,\"ts\":1700,\"pad\":\"\"}"}"#
            ),
            Some((42, 1700))
        );
        assert_eq!(parse_event(r#"{"seq":7,"ts":-5}"#), Some((7, -5)));
        assert_eq!(parse_event("nothing"), None);
    }

    #[test]
    fn the_order_is_about_2_kb_and_parses() {
        let o = order_json(7);
        assert!((1500..2600).contains(&o.len()), "{}", o.len());
        let data = format!(r#"{{"seq":7,"ts":99,"order":{o}}}"#);
        let frame = serde_json::json!({"event": "bench", "data": data}).to_string();
        assert_eq!(parse_event(&frame), Some((7, 99)));
    }
}

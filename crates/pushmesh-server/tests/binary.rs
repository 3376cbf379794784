//! The real `pushmesh` binary: it survives the environment platforms give
//! it, and never prints a configured secret.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

struct Node {
    child: Child,
    addr: SocketAddr,
    output: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

/// Starts the binary with a clean `PUSHMESH_*` environment plus `env`;
/// returns once it printed its address.
fn start(args: &[&str], env: &[(&str, &str)]) -> Node {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pushmesh"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy()
            .to_ascii_uppercase()
            .starts_with("PUSHMESH_")
        {
            cmd.env_remove(k);
        }
    }
    cmd.env_remove("RUST_LOG")
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start pushmesh: {e}"));
    let output = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel::<String>();
    let mut readers = Vec::new();
    let stdout: Box<dyn Read + Send> =
        Box::new(child.stdout.take().unwrap_or_else(|| panic!("no stdout")));
    let stderr: Box<dyn Read + Send> =
        Box::new(child.stderr.take().unwrap_or_else(|| panic!("no stderr")));
    for stream in [stdout, stderr] {
        let (out, tx) = (output.clone(), tx.clone());
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                out.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_str(&line);
                out.lock().unwrap_or_else(|p| p.into_inner()).push('\n');
                let _ = tx.send(line);
            }
        }));
    }
    let addr = loop {
        match rx.recv_timeout(WAIT) {
            Ok(line) => {
                if let Some(a) = line.split("listening on ").nth(1) {
                    break a.trim().parse().unwrap_or_else(|e| panic!("{line}: {e}"));
                }
            }
            Err(e) => panic!(
                "pushmesh did not start ({e}): {}",
                output.lock().unwrap_or_else(|p| p.into_inner())
            ),
        }
    };
    Node {
        child,
        addr,
        output,
        readers,
    }
}

impl Node {
    fn get(&self, path: &str) -> String {
        let mut s = TcpStream::connect(self.addr).unwrap_or_else(|e| panic!("{e}"));
        s.set_read_timeout(Some(WAIT))
            .unwrap_or_else(|e| panic!("{e}"));
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap_or_else(|e| panic!("{e}"));
        r
    }

    /// SIGTERM, wait for the exit (bounded), return everything it printed.
    fn stop(self) -> String {
        let pid = self.child.id().to_string();
        let killed = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(killed.is_ok_and(|s| s.success()), "kill -TERM {pid} failed");
        let (status, out) = self.wait("pushmesh did not stop");
        assert!(status.success(), "exit {status}: {out}");
        out
    }

    /// Waits (bounded, else panics with `late`) for the exit; its status
    /// and everything it printed.
    fn wait(mut self, late: &str) -> (std::process::ExitStatus, String) {
        let (tx, rx) = mpsc::channel();
        let mut child = self.child;
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let status = rx
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("{late}"))
            .unwrap_or_else(|e| panic!("{e}"));
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let out = self
            .output
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        (status, out)
    }
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn kubernetes_service_links_and_unknown_variables_do_not_stop_the_node() {
    let node = start(
        &["--listen", "127.0.0.1:0", "--log", "warn"],
        &[
            ("PUSHMESH_SERVICE_HOST", "10.96.0.12"),
            ("PUSHMESH_SERVICE_PORT", "6001"),
            ("PUSHMESH_PORT", "tcp://10.96.0.12:6001"),
            ("PUSHMESH_PORT_80_TCP", "tcp://10.96.0.12:80"),
            ("PUSHMESH_PEERS_SERVICE_PORT", "7000"),
            ("PUSHMESH_BIN", "/usr/local/bin/pushmesh"),
            ("PUSHMESH_LISTN", "127.0.0.1:1"),
        ],
    );
    let health = node.get("/healthz");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let out = node.stop();
    assert!(
        out.contains("unknown environment variable ignored variable=PUSHMESH_LISTN did_you_mean=PUSHMESH_LISTEN"),
        "{out}"
    );
    assert_eq!(
        out.matches("PUSHMESH_BIN").count(),
        1,
        "warned about once: {out}"
    );
    for silent in ["PUSHMESH_SERVICE", "PUSHMESH_PORT", "PUSHMESH_PEERS"] {
        assert!(!out.contains(silent), "{silent} reported: {out}");
    }
}

#[test]
fn configured_secrets_never_appear_in_the_output() {
    let app_secret = "app-secret-5f2b9c0e7d";
    let dashboard_token = "dashboard-token-a8e1c4";
    let broadcasting_key = "broadcasting-key-93d7f1";
    let cluster_secret = "cluster-secret-41c6b2e8aa";
    let dir = std::env::temp_dir().join(format!("pushmesh-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let file = dir.join("pushmesh.toml");
    std::fs::write(
        &file,
        format!(
            "dashboard_token = \"{dashboard_token}\"\nbroadcasting_key = \"{broadcasting_key}\"\n\
             [[apps]]\nid = \"prod-app\"\nkey = \"prod-key\"\nsecret = \"{app_secret}\"\n"
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (gossip, quic) = (free_udp_port(), free_udp_port());
    let (gossip, quic) = (format!("127.0.0.1:{gossip}"), format!("127.0.0.1:{quic}"));
    let config = file.to_string_lossy().to_string();
    let node = start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--log",
            "debug",
            "--config",
            &config,
            "--gossip-listen",
            &gossip,
            "--cluster-listen",
            &quic,
            "--node-id",
            "secretive",
        ],
        &[("PUSHMESH_CLUSTER_SECRET", cluster_secret)],
    );
    let health = node.get("/healthz");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let _ = node.get("/dashboard?token=wrong");
    let out = node.stop();
    assert!(out.contains("app id: prod-app  key: prod-key"), "{out}");
    assert!(out.contains("node secretive"), "{out}");
    for secret in [
        app_secret,
        dashboard_token,
        broadcasting_key,
        cluster_secret,
    ] {
        assert!(!out.contains(secret), "{secret} printed: {out}");
    }
    assert!(!out.contains("Development app"), "{out}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_development_app_is_announced_only_by_default() {
    let node = start(&["--listen", "127.0.0.1:0", "--log", "warn"], &[]);
    let out = node.stop();
    assert!(out.contains("Development app"), "{out}");
    assert!(out.contains("secret: 'app-secret'"), "{out}");
}

impl Node {
    /// Waits (bounded) for the process to exit by itself; its status and output.
    fn exited(self) -> (std::process::ExitStatus, String) {
        self.wait("pushmesh did not exit by itself")
    }

    fn output(&self) -> String {
        self.output
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Waits (bounded) until `cond` holds on `node`'s output or HTTP answers.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn cluster_args(node_id: &str, gossip: &str, seed: Option<&str>) -> Vec<String> {
    let mut a: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--log",
        "info",
        "--node-id",
        node_id,
        "--gossip-listen",
        gossip,
        "--cluster-listen",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push(format!("127.0.0.1:{}", free_udp_port()));
    if let Some(s) = seed {
        a.push("--seed".into());
        a.push(s.into());
    }
    a
}

#[test]
fn a_second_node_with_a_node_id_in_use_refuses_to_start_and_the_first_shows_it() {
    let secret = [("PUSHMESH_CLUSTER_SECRET", "identity test cluster secret")];
    let a_gossip = format!("127.0.0.1:{}", free_udp_port());
    let args = cluster_args("twin", &a_gossip, None);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let a = start(&args, &secret);
    let b_gossip = format!("127.0.0.1:{}", free_udp_port());
    let args = cluster_args("twin", &b_gossip, Some(&a_gossip));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let b = start(&args, &secret);
    let (status, b_out) = b.exited();
    assert_eq!(status.code(), Some(1), "{b_out}");
    assert!(
        b_out.contains(&format!(
            "node_id \"twin\" is already in use by a live node at {a_gossip}"
        )),
        "{b_out}"
    );
    // The running node logged it at error and lists it on /cluster (for as
    // long as the refused node's gossip state looks live).
    eventually("the running node to log the conflict", || {
        a.output().contains("ERROR") && a.output().contains("is already in use by a live node")
    });
    let out = a.output();
    assert!(out.contains(&b_gossip), "{out}");
    let a_out = a.stop();
    assert!(!a_out.contains("refusing to start"), "{a_out}");
}

#[test]
fn gossip_with_a_wrong_cluster_secret_is_logged_with_the_sender() {
    let a_gossip = format!("127.0.0.1:{}", free_udp_port());
    let args = cluster_args("right", &a_gossip, None);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let a = start(
        &args,
        &[("PUSHMESH_CLUSTER_SECRET", "the right cluster secret")],
    );
    let b_gossip = format!("127.0.0.1:{}", free_udp_port());
    let args = cluster_args("wrong", &b_gossip, Some(&a_gossip));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let b = start(
        &args,
        &[("PUSHMESH_CLUSTER_SECRET", "a wrong cluster secret!")],
    );
    let warning =
        format!("gossip datagram from {b_gossip} failed authentication: wrong cluster secret");
    eventually("a warning about the wrong secret", || {
        a.output().contains(&warning)
    });
    // Gossip goes every 500 ms: over 3 s, still one line (≤ 1 per sender per 10 s).
    std::thread::sleep(Duration::from_secs(3));
    let _ = b.stop();
    let out = a.stop();
    assert_eq!(out.matches(&warning).count(), 1, "{out}");
    let line = out
        .lines()
        .find(|l| l.contains(&warning))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("WARN"), "{line}");
}

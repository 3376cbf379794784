//! The `[cluster]` table, its flags, and the clustering settings resolved
//! from them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{generated_node_id, Cli, ConfigError};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileCluster {
    node_id: Option<String>,
    cluster_id: Option<String>,
    gossip_listen: Option<SocketAddr>,
    gossip_advertise: Option<SocketAddr>,
    cluster_listen: Option<SocketAddr>,
    cluster_advertise: Option<SocketAddr>,
    #[serde(default)]
    seeds: Vec<String>,
    secret: Option<String>,
    secret_file: Option<PathBuf>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    gossip_interval_ms: Option<u64>,
    phi_threshold: Option<f64>,
    dead_node_grace_secs: Option<u64>,
    peer_queue: Option<usize>,
    drain_wait_ms: Option<u64>,
    startup_timeout_ms: Option<u64>,
    subscribe_barrier_ms: Option<u64>,
    publish_ack_ms: Option<u64>,
    min_cluster_size: Option<usize>,
}

/// Clustering settings (present when clustering is on).
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// This node's id.
    pub node_id: String,
    /// Cluster id.
    pub cluster_id: String,
    /// Gossip UDP address.
    pub gossip_listen: SocketAddr,
    /// Advertised gossip address.
    pub gossip_advertise: SocketAddr,
    /// QUIC UDP address.
    pub cluster_listen: SocketAddr,
    /// Advertised QUIC address.
    pub cluster_advertise: SocketAddr,
    /// Seeds.
    pub seeds: Vec<String>,
    /// The secret.
    pub secret: String,
    /// CA, certificate and key files; `None`: derived from the secret.
    pub certs: Option<(PathBuf, PathBuf, PathBuf)>,
    /// Gossip interval.
    pub gossip_interval: Duration,
    /// Failure detector phi threshold.
    pub phi_threshold: f64,
    /// How long dead nodes are remembered.
    pub dead_node_grace: Duration,
    /// Frames queued per peer.
    pub peer_queue: usize,
    /// How long a draining node, not ready, keeps serving and routing
    /// publishes before it refuses them and closes its clients.
    pub drain_wait: Duration,
    /// How long a starting node waits to join before it is ready alone.
    pub startup_timeout: Duration,
    /// Longest wait of the subscription barrier.
    pub subscribe_barrier: Duration,
    /// Longest wait of a publish's answer for the acknowledgement of every
    /// peer with subscribers (past it: 503 `peer_unacknowledged`).
    pub publish_ack: Duration,
    /// Nodes (this one included) a starting node must have joined before
    /// it is ready; `startup_timeout` does not lower it.
    pub min_cluster_size: usize,
}

pub(super) fn resolve_cluster(
    cli: &Cli,
    f: FileCluster,
) -> Result<Option<ClusterSettings>, ConfigError> {
    let invalid = |m: &str| ConfigError::Invalid(m.to_string());
    let gossip_listen = cli.gossip_listen.or(f.gossip_listen);
    let seeds: Vec<String> = if cli.seeds.is_empty() {
        f.seeds
    } else {
        cli.seeds.clone()
    };
    for s in &seeds {
        super::check::seed("seeds".into(), s)?;
    }
    let cluster_listen = cli.cluster_listen.or(f.cluster_listen);
    if gossip_listen.is_none() && seeds.is_empty() && cluster_listen.is_none() {
        if cli.min_cluster_size.or(f.min_cluster_size).unwrap_or(1) > 1 {
            return Err(invalid(
                "min_cluster_size above 1 needs clustering (--gossip-listen and --seed)",
            ));
        }
        return Ok(None);
    }
    let gossip_listen = gossip_listen.ok_or_else(|| {
        invalid("clustering needs --gossip-listen ADDR:PORT (seeds or --cluster-listen were given)")
    })?;
    let cluster_listen = cluster_listen.unwrap_or_else(|| {
        let mut a = gossip_listen;
        a.set_port(gossip_listen.port().wrapping_add(1));
        a
    });
    let advertise = |given: Option<SocketAddr>, listen: SocketAddr, flag: &str| {
        let a = given.unwrap_or(listen);
        if a.ip().is_unspecified() || a.port() == 0 {
            Err(ConfigError::Invalid(format!(
                "{flag}: listening on {listen}, peers need a concrete address: set {flag}"
            )))
        } else {
            Ok(a)
        }
    };
    let gossip_advertise = advertise(
        cli.gossip_advertise.or(f.gossip_advertise),
        gossip_listen,
        "--gossip-advertise",
    )?;
    let cluster_advertise = advertise(
        cli.cluster_advertise.or(f.cluster_advertise),
        cluster_listen,
        "--cluster-advertise",
    )?;
    let secret = match (
        cli.cluster_secret.clone().or(f.secret),
        cli.cluster_secret_file.clone().or(f.secret_file),
    ) {
        (Some(s), _) => s,
        (None, Some(path)) => std::fs::read_to_string(&path)
            .map_err(|source| ConfigError::Read { path: path.clone(), source })?
            .trim()
            .to_string(),
        (None, None) => {
            return Err(invalid(
                "clustering needs a cluster secret: --cluster-secret, --cluster-secret-file or PUSHMESH_CLUSTER_SECRET",
            ))
        }
    };
    if secret.len() < 16 {
        return Err(invalid("the cluster secret must be at least 16 characters"));
    }
    let certs = match (
        cli.cluster_ca.clone().or(f.ca),
        cli.cluster_cert.clone().or(f.cert),
        cli.cluster_key.clone().or(f.key),
    ) {
        (None, None, None) => None,
        (Some(ca), Some(cert), Some(key)) => Some((ca, cert, key)),
        _ => return Err(invalid("give all of --cluster-ca, --cluster-cert and --cluster-key, or none (development mode)")),
    };
    let node_id = cli
        .node_id
        .clone()
        .or(f.node_id)
        .unwrap_or_else(generated_node_id);
    // Every node certificate carries this name; as a node id it would match any.
    if node_id == pushmesh_cluster::tls::NODE_SERVER_NAME || node_id.is_empty() {
        return Err(invalid(&format!(
            "node id {node_id:?} is reserved or empty; choose another --node-id"
        )));
    }
    let min_cluster_size = cli.min_cluster_size.or(f.min_cluster_size).unwrap_or(1);
    if min_cluster_size == 0 {
        return Err(invalid(
            "min_cluster_size must be at least 1 (the node itself)",
        ));
    }
    Ok(Some(ClusterSettings {
        node_id,
        cluster_id: cli
            .cluster_id
            .clone()
            .or(f.cluster_id)
            .unwrap_or_else(|| "pushmesh".into()),
        gossip_listen,
        gossip_advertise,
        cluster_listen,
        cluster_advertise,
        seeds,
        secret,
        certs,
        gossip_interval: Duration::from_millis(f.gossip_interval_ms.unwrap_or(500)),
        phi_threshold: f.phi_threshold.unwrap_or(8.0),
        dead_node_grace: Duration::from_secs(f.dead_node_grace_secs.unwrap_or(60)),
        peer_queue: f.peer_queue.unwrap_or(65_536),
        drain_wait: Duration::from_millis(f.drain_wait_ms.unwrap_or(5000)),
        startup_timeout: Duration::from_millis(f.startup_timeout_ms.unwrap_or(10_000)),
        subscribe_barrier: Duration::from_millis(f.subscribe_barrier_ms.unwrap_or(1000)),
        publish_ack: Duration::from_millis(f.publish_ack_ms.unwrap_or(1000)),
        min_cluster_size,
    }))
}

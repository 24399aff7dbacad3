//! Redis Cluster (`REDIS_CLUSTER_NODES`): the redis crate's async cluster client behind the same
//! `Redis` handle. One cluster connection (it multiplexes, follows MOVED/ASK and reconnects by
//! itself) replaces the pool. Keys of one script or transaction share a hash tag (see `keys`), so
//! they stay on one slot. What needs a particular node is here: pub/sub (classic channels: a
//! PUBLISH on any node reaches subscribers on every node), SCAN per master, INFO of every master.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bb8_redis::redis::aio::PubSub;
use bb8_redis::redis::cluster::{ClusterClient, ClusterClientBuilder};
use bb8_redis::redis::cluster_async::ClusterConnection;
use bb8_redis::redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo};
use bb8_redis::redis::{self, RedisResult, Value};

use super::{ConnectErrors, RedisFailure};
use crate::config::RedisSettings;

pub(super) struct Cluster {
    client: ClusterClient,
    /// One client per seed node, for the pub/sub connection (tried in turn).
    seeds: Vec<redis::Client>,
    next_seed: AtomicUsize,
    connection: tokio::sync::OnceCell<ClusterConnection>,
    connect_timeout: Duration,
}

impl Cluster {
    pub(super) fn new(settings: &RedisSettings, root_cert: Option<Vec<u8>>) -> Result<Self, RedisFailure> {
        let config = |err: redis::RedisError| RedisFailure::Config(format!("REDIS_CLUSTER_NODES: {err}"));
        let nodes = &settings.cluster_nodes;
        // The client's own retries (MOVED after a failover, a node reconnecting) stay well
        // inside the command timeout, which bounds every call anyway.
        let retry_wait_ms = (settings.command_timeout.as_millis() as u64 / 10).max(1);
        let mut builder = ClusterClientBuilder::new(nodes.iter().map(String::as_str))
            .connection_timeout(settings.connect_timeout)
            .response_timeout(settings.command_timeout)
            .overall_response_timeout(Some(settings.command_timeout))
            .retries(3)
            .min_retry_wait(retry_wait_ms)
            .max_retry_wait(retry_wait_ms * 2);
        let certificates = |root_cert: &Option<Vec<u8>>| redis::TlsCertificates {
            client_tls: None,
            root_cert: root_cert.clone(),
        };
        if root_cert.is_some() {
            builder = builder.certs(certificates(&root_cert));
        }
        let client = builder.build().map_err(config)?;
        let seeds = nodes
            .iter()
            .map(|node| match &root_cert {
                Some(_) if node.starts_with("rediss://") => {
                    redis::Client::build_with_tls(node.as_str(), certificates(&root_cert))
                }
                _ => redis::Client::open(node.as_str()),
            })
            .collect::<RedisResult<Vec<_>>>()
            .map_err(config)?;
        Ok(Self {
            client,
            seeds,
            next_seed: AtomicUsize::new(0),
            connection: tokio::sync::OnceCell::new(),
            connect_timeout: settings.connect_timeout,
        })
    }

    /// The cluster connection, made on first use within the connect timeout (and again by a
    /// later call if that failed).
    pub(super) async fn connection(&self, errors: &ConnectErrors) -> Result<ClusterConnection, RedisFailure> {
        let connect = || async {
            match tokio::time::timeout(self.connect_timeout, self.client.get_async_connection()).await {
                Ok(Ok(connection)) => Ok(connection),
                Ok(Err(err)) => {
                    errors.record(err.clone());
                    Err(RedisFailure::Command(err))
                }
                Err(_) => Err(RedisFailure::Timeout(self.connect_timeout)),
            }
        };
        self.connection.get_or_try_init(connect).await.cloned()
    }

    pub(super) fn is_connected(&self) -> bool {
        self.connection.initialized()
    }

    /// A pub/sub connection to one seed node: the last one that answered first, then the others.
    pub(super) async fn pubsub(&self) -> Result<PubSub, RedisFailure> {
        let first = self.next_seed.load(Ordering::Relaxed);
        let mut last = RedisFailure::Timeout(self.connect_timeout);
        for offset in 0..self.seeds.len() {
            let index = (first + offset) % self.seeds.len();
            match tokio::time::timeout(self.connect_timeout, self.seeds[index].get_async_pubsub()).await {
                Ok(Ok(pubsub)) => {
                    // Next time (after this node failed us), start with the one after it.
                    self.next_seed.store(index + 1, Ordering::Relaxed);
                    return Ok(pubsub);
                }
                Ok(Err(err)) => last = RedisFailure::Command(err),
                Err(_) => last = RedisFailure::Timeout(self.connect_timeout),
            }
        }
        Err(last)
    }
}

/// The masters (host, port), from `CLUSTER SLOTS`.
pub(super) async fn masters(connection: &mut ClusterConnection) -> RedisResult<Vec<(String, u16)>> {
    let slots: Vec<Value> = redis::cmd("CLUSTER").arg("SLOTS").query_async(connection).await?;
    let mut masters = Vec::new();
    for range in slots {
        // [start, end, [host, port, id, ...], replicas...]
        let Value::Array(parts) = range else { continue };
        let Some(Value::Array(master)) = parts.get(2) else {
            continue;
        };
        let (Some(host), Some(port)) = (master.first(), master.get(1)) else {
            continue;
        };
        let host: String = redis::from_redis_value_ref(host)?;
        let port: u16 = redis::from_redis_value_ref(port)?;
        if !masters.contains(&(host.clone(), port)) {
            masters.push((host, port));
        }
    }
    Ok(masters)
}

/// One command on one node.
pub(super) async fn on_node(
    connection: &mut ClusterConnection,
    (host, port): &(String, u16),
    command: redis::Cmd,
) -> RedisResult<Value> {
    let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
        host: host.clone(),
        port: *port,
    });
    connection.route_command(command, routing).await
}

/// `INFO <section>` of every master: (address, text).
pub(super) async fn info_of_masters(
    connection: &mut ClusterConnection,
    section: &str,
) -> RedisResult<Vec<(String, String)>> {
    let routing = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
    let value = connection
        .route_command(redis::cmd("INFO").arg(section).to_owned(), routing)
        .await?;
    Ok(redis::from_redis_value(value)?)
}

//! The one Redis client of the sidecar, shared by `scope: Global` rate limits and the shared
//! cache tier: a connection (single node, or a Redis Cluster from seed nodes) made in the
//! background, every call under the configured timeout, and one circuit breaker: after
//! repeated failures nothing calls Redis for a second, so a dead Redis costs requests no
//! waiting. Every call Redis does not answer is counted by why
//! (`apipolicy_ratelimit_store_errors_total{reason}`).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwapOption;
use prometheus::Histogram;
use redis::{
    AsyncCommands as _, ScriptInvocation,
    aio::{ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
};

use crate::metrics::StoreErrors;

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// Why Redis gave no decision.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Redis failed: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("Redis is not connected yet")]
    NotConnected,
    #[error("the circuit breaker is open after repeated Redis failures")]
    CircuitOpen,
}

/// Consecutive failures that open the breaker, and how long it stays open.
const BREAKER_FAILURES: u32 = 5;
const BREAKER_OPEN: Duration = Duration::from_secs(1);

pub struct Redis {
    /// The URLs this store was made for (to keep it across reloads that do not change them).
    pub urls: Vec<String>,
    pub cluster: bool,
    conn: Arc<ArcSwapOption<Conn>>,
    pub timeout: Duration,
    failures: AtomicU32,
    open_until_ms: AtomicU64,
    epoch: Instant,
    errors: StoreErrors,
    latency: Histogram,
}

impl Redis {
    /// Starts connecting in the background; decisions fail over to `onStoreFailure` until the
    /// connection is up.
    pub fn new(
        urls: Vec<String>,
        cluster: bool,
        timeout: Duration,
        errors: StoreErrors,
        latency: Histogram,
    ) -> Result<Self, redis::RedisError> {
        let conn = Arc::new(ArcSwapOption::empty());
        if cluster {
            let client = ClusterClient::builder(urls.clone())
                .connection_timeout(timeout.max(Duration::from_millis(250)))
                .response_timeout(timeout)
                .retries(1)
                .build()?;
            let slot = conn.clone();
            tokio::spawn(async move {
                loop {
                    match client.get_async_connection().await {
                        Ok(c) => {
                            slot.store(Some(Arc::new(Conn::Cluster(c))));
                            tracing::info!("connected to the Redis Cluster");
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot connect to the Redis Cluster yet; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
            });
        } else {
            let client = redis::Client::open(urls[0].as_str())?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout.max(Duration::from_millis(250))))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(1));
            let manager = ConnectionManager::new_lazy_with_config(client, config)?;
            conn.store(Some(Arc::new(Conn::Single(manager))));
        }
        Ok(Self {
            urls,
            cluster,
            conn,
            timeout,
            failures: AtomicU32::new(0),
            open_until_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            errors,
            latency,
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Counts a decision or call made without Redis, by why.
    fn count(&self, e: &StoreError) {
        match e {
            StoreError::Timeout(_) => &self.errors.timeout,
            StoreError::CircuitOpen => &self.errors.circuit_open,
            StoreError::Redis(_) | StoreError::NotConnected => &self.errors.error,
        }
        .inc();
    }

    /// Runs a script under the timeout and the circuit breaker, timed into the latency
    /// histogram: one rate-limit decision.
    pub async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        if self.now_ms() < self.open_until_ms.load(Ordering::Relaxed) {
            self.count(&StoreError::CircuitOpen);
            return Err(StoreError::CircuitOpen);
        }
        let Some(conn) = self.conn.load_full() else {
            return Err(self.fail(StoreError::NotConnected));
        };
        let started = Instant::now();
        let answer = tokio::time::timeout(self.timeout, async {
            match (*conn).clone() {
                Conn::Single(mut c) => invocation.invoke_async::<T>(&mut c).await,
                Conn::Cluster(mut c) => invocation.invoke_async::<T>(&mut c).await,
            }
        })
        .await;
        self.latency.observe(started.elapsed().as_secs_f64());
        self.settle(answer)
    }

    /// Runs one command under the timeout and the circuit breaker (shared with the limits: a
    /// Redis that fails one fails both).
    pub async fn command<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        if self.now_ms() < self.open_until_ms.load(Ordering::Relaxed) {
            self.count(&StoreError::CircuitOpen);
            return Err(StoreError::CircuitOpen);
        }
        let Some(conn) = self.conn.load_full() else {
            self.count(&StoreError::NotConnected);
            return Err(StoreError::NotConnected);
        };
        let result = tokio::time::timeout(self.timeout, async {
            match (*conn).clone() {
                Conn::Single(mut c) => cmd.query_async::<T>(&mut c).await,
                Conn::Cluster(mut c) => cmd.query_async::<T>(&mut c).await,
            }
        })
        .await;
        self.settle(result)
    }

    /// A call's outcome: a success closes the breaker's count, a failure adds to it.
    fn settle<T>(
        &self,
        result: Result<Result<T, redis::RedisError>, tokio::time::error::Elapsed>,
    ) -> Result<T, StoreError> {
        match result {
            Ok(Ok(v)) => {
                self.failures.store(0, Ordering::Relaxed);
                Ok(v)
            }
            Ok(Err(e)) => Err(self.fail(StoreError::Redis(e))),
            Err(_) => Err(self.fail(StoreError::Timeout(self.timeout))),
        }
    }

    /// Counts a failure; after [`BREAKER_FAILURES`] in a row, stops calling for [`BREAKER_OPEN`].
    fn fail(&self, e: StoreError) -> StoreError {
        self.count(&e);
        if self.failures.fetch_add(1, Ordering::Relaxed) + 1 >= BREAKER_FAILURES {
            self.failures.store(0, Ordering::Relaxed);
            self.open_until_ms.store(self.now_ms() + BREAKER_OPEN.as_millis() as u64, Ordering::Relaxed);
            tracing::warn!(error = %e, "Redis keeps failing: not calling it for {BREAKER_OPEN:?}");
        }
        e
    }

    /// Reaches Redis now: for readiness reporting and tests.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let conn = self.conn.load_full().ok_or(StoreError::NotConnected)?;
        let result: Result<Result<(), redis::RedisError>, _> = tokio::time::timeout(self.timeout, async {
            match (*conn).clone() {
                Conn::Single(mut c) => c.ping::<()>().await,
                Conn::Cluster(mut c) => c.ping::<()>().await,
            }
        })
        .await;
        result.map_err(|_| StoreError::Timeout(self.timeout))?.map_err(StoreError::from)
    }
}

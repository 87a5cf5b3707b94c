//! The shared cache tier in Redis, below each pod's memory: a new pod starts warm, N pods
//! missing the same URL make one request to the app (a lock in Redis: SET NX with a token
//! and a short expiry, released only by its owner), and purges and invalidations reach every
//! pod of the policy (pub/sub).
//!
//! A purge bumps the policy's generation in Redis, which retires every shared entry of the
//! policy at once (coarser than the memory tier, which purges by key and path, and always
//! correct).
//!
//! Pods hear each other by classic PUBLISH and SUBSCRIBE, with single-node Redis and with a
//! Redis Cluster alike: a cluster's bus carries every PUBLISH to the subscribers of every
//! node, so each pod listens on one configured node, and on the next one when that one fails
//! (closes the connection, refuses it, or stops answering pings). What is published while a
//! pod is not listening does not reach it. On listening again, it compares the generation
//! with the purges it heard, and clears its memory tier if it missed one; an invalidation
//! missed that way lasts until the entry expires.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};

use super::{CacheKey, Entry, Store};
use crate::redis_client::Redis;

/// The cache's tier in Redis, shared by the pods of a policy: entries, fill locks and the purge
/// generation.
pub struct SharedTier {
    redis: Arc<Redis>,
    /// `namespace/policy`: entries of other policies are never seen.
    scope: String,
    /// Tells this pod's own messages from others'.
    instance: u64,
    subscriber: tokio::task::JoinHandle<()>,
}

impl Drop for SharedTier {
    fn drop(&mut self) {
        self.subscriber.abort();
    }
}

/// The outcome of asking for the fill lock of a URL.
pub enum FillLock {
    /// This pod fills the URL, and releases the lock with this token.
    Acquired(String),
    /// Another pod is filling it.
    Held,
    /// Redis did not answer: fill without it.
    Unavailable,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    /// The request's Host and the headers the response's Vary names, to judge the entry again.
    request: Vec<(String, Vec<u8>)>,
    stored_at_ms: u64,
    generation: u64,
    /// The `ETag` is the sidecar's own ([`Entry::own_etag`]).
    #[serde(default)]
    own_etag: bool,
    #[serde(with = "serde_bytes_b64")]
    body: Vec<u8>,
}

/// Bodies as base64 in the JSON record.
mod serde_bytes_b64 {
    use serde::{Deserialize, Deserializer, Serializer};

    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
        for chunk in bytes.chunks(3) {
            let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        s.serialize_str(&out)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        let mut out = Vec::with_capacity(text.len() / 4 * 3);
        let mut acc = 0u32;
        let mut bits = 0;
        for c in text.bytes().filter(|c| *c != b'=') {
            let v = ALPHABET
                .iter()
                .position(|a| *a == c)
                .ok_or_else(|| serde::de::Error::custom("not base64"))?;
            acc = (acc << 6) | v as u32;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
        }
        Ok(out)
    }
}

/// What pods tell each other.
#[derive(Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Message {
    from: u64,
    /// A purge's generation, the one its INCR made (none if Redis did not answer it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    generation: Option<u64>,
    #[serde(default)]
    purge_keys: Vec<String>,
    #[serde(default)]
    purge_paths: Vec<String>,
    #[serde(default)]
    invalidate: Vec<u64>,
}

fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl SharedTier {
    pub fn new(redis: Arc<Redis>, scope: String, store: Arc<Store>) -> Arc<Self> {
        let instance = fastrand::u64(..);
        let subscriber = tokio::spawn(subscribe(redis.clone(), scope.clone(), instance, store));
        Arc::new(Self { redis, scope, instance, subscriber })
    }

    /// Whether this tier is for `redis` and `scope` (kept across reloads that change neither).
    pub fn same(&self, redis: &Arc<Redis>, scope: &str) -> bool {
        Arc::ptr_eq(&self.redis, redis) && self.scope == scope
    }

    fn entry_key(&self, hash: u64) -> String {
        format!("apipolicy:cache:{{{}/{hash:016x}}}", self.scope)
    }

    fn lock_key(&self, hash: u64) -> String {
        format!("apipolicy:fill:{{{}/{hash:016x}}}", self.scope)
    }

    fn channel(&self) -> String {
        channel(&self.scope)
    }

    async fn generation(&self) -> u64 {
        generation(&self.redis, &self.scope).await.unwrap_or(0)
    }

    /// The shared entry for `key`, if there is one of the current generation.
    pub async fn get(&self, config: &apipolicy_api::CacheConfig, key: &CacheKey) -> Option<Entry> {
        let raw: Option<Vec<u8>> =
            self.redis.command(redis::cmd("GET").arg(self.entry_key(key.hash))).await.ok().flatten();
        let stored: Stored = serde_json::from_slice(&raw?).ok()?;
        if stored.generation != self.generation().await {
            return None;
        }
        let headers = to_map(&stored.headers);
        let request = to_map(&stored.request);
        let status = StatusCode::from_u16(stored.status).ok()?;
        let at = UNIX_EPOCH + Duration::from_millis(stored.stored_at_ms);
        let mut entry = super::entry(config, key, &request, status, headers, Bytes::from(stored.body), at);
        entry.own_etag = stored.own_etag;
        Some(entry)
    }

    /// Puts an entry in the shared tier, to live as long as it may be served stale.
    pub async fn put(&self, key: &CacheKey, entry: &Entry, request_headers: &HeaderMap, now: SystemTime) {
        let vary: Vec<String> = entry
            .headers
            .get_all(http::header::VARY)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|n| n.trim().to_ascii_lowercase())
            .collect();
        let request = request_headers
            .iter()
            // The policy matches on Host as well as on what Vary names.
            .filter(|(n, _)| *n == http::header::HOST || vary.iter().any(|v| v == n.as_str()))
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect();
        let stored = Stored {
            status: entry.status.as_u16(),
            headers: entry
                .stored_headers()
                .iter()
                .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                .collect(),
            request,
            stored_at_ms: epoch_ms(now),
            own_etag: entry.own_etag,
            generation: self.generation().await,
            body: entry.body.to_vec(),
        };
        let keep = entry.fresh_until.duration_since(now).unwrap_or_default()
            + entry.stale_while_revalidate.max(entry.stale_if_error);
        let Ok(json) = serde_json::to_vec(&stored) else { return };
        let ms = keep.as_millis().max(1000) as u64;
        let _: Result<(), _> = self
            .redis
            .command(redis::cmd("SET").arg(self.entry_key(key.hash)).arg(json).arg("PX").arg(ms))
            .await;
    }

    /// Takes the fill lock for `hash`.
    pub async fn lock(&self, hash: u64, hold: Duration) -> FillLock {
        let token = format!("{:016x}{:016x}", self.instance, fastrand::u64(..));
        let ms = hold.as_millis().max(100) as u64;
        let answer = self
            .redis
            .command::<Option<String>>(
                redis::cmd("SET").arg(self.lock_key(hash)).arg(&token).arg("NX").arg("PX").arg(ms),
            )
            .await;
        match answer {
            Ok(Some(_)) => FillLock::Acquired(token),
            Ok(None) => FillLock::Held,
            Err(_) => FillLock::Unavailable,
        }
    }

    /// Releases the lock, only if it is still this pod's.
    pub async fn unlock(&self, hash: u64, token: &str) {
        const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";
        let _: Result<i64, _> = self
            .redis
            .command(redis::cmd("EVAL").arg(RELEASE).arg(1).arg(self.lock_key(hash)).arg(token))
            .await;
    }

    /// Forgets a URL in every pod and in Redis.
    pub async fn invalidate(&self, hash: u64) {
        let _: Result<i64, _> = self.redis.command(redis::cmd("DEL").arg(self.entry_key(hash))).await;
        self.publish(Message { from: self.instance, invalidate: vec![hash], ..Default::default() }).await;
    }

    /// Retires the shared tier of the policy and tells every pod to purge its memory.
    pub async fn purge(&self, keys: &[String], paths: &[String]) -> bool {
        let generation =
            self.redis.command::<u64>(redis::cmd("INCR").arg(generation_key(&self.scope))).await.ok();
        self.publish(Message {
            from: self.instance,
            generation,
            purge_keys: keys.to_vec(),
            purge_paths: paths.to_vec(),
            ..Default::default()
        })
        .await;
        generation.is_some()
    }

    async fn publish(&self, message: Message) {
        let Ok(json) = serde_json::to_string(&message) else { return };
        let _: Result<i64, _> = self.redis.command(redis::cmd("PUBLISH").arg(self.channel()).arg(json)).await;
    }
}

fn channel(scope: &str) -> String {
    format!("apipolicy:events:{scope}")
}

fn generation_key(scope: &str) -> String {
    format!("apipolicy:generation:{{{scope}}}")
}

/// The policy's generation (0 before its first purge), `None` when Redis does not answer.
async fn generation(redis: &Redis, scope: &str) -> Option<u64> {
    let answer = redis.command::<Option<u64>>(redis::cmd("GET").arg(generation_key(scope))).await;
    answer.ok().map(|g| g.unwrap_or(0))
}

fn to_map(pairs: &[(String, Vec<u8>)]) -> HeaderMap {
    let mut m = HeaderMap::new();
    for (n, v) in pairs {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(n.as_bytes()), HeaderValue::from_bytes(v)) {
            m.append(n, v);
        }
    }
    m
}

/// How often a listening pod pings its node: one that stops answering (a host gone without
/// closing its connections, a hung server) is left after this and the Redis timeout.
const HEARTBEAT: Duration = Duration::from_secs(2);

/// Applies other pods' purges and invalidations to this pod's memory tier.
///
/// It listens on one node at a time, the configured URLs in turn: the next one after each
/// failure, after a backoff. Any node does, since a Redis Cluster carries a PUBLISH to the
/// subscribers of every node (the `PUBLISH` itself goes where the cluster client routes it).
/// Each time it listens again, it checks that it heard every purge since it last started
/// listening, and clears the memory tier if it did not.
async fn subscribe(redis: Arc<Redis>, scope: String, instance: u64, store: Arc<Store>) {
    const FIRST_BACKOFF: Duration = Duration::from_millis(200);
    let channel = channel(&scope);
    // A node that accepts the connection and never answers must not hold the subscriber.
    let limit = redis.timeout.max(Duration::from_secs(1));
    let mut backoff = FIRST_BACKOFF;
    let mut tries = 0usize;
    // From the last subscription: the generation when it started (`None`: Redis did not
    // say), and how many purges of later generations it heard.
    let mut last: Option<(Option<u64>, u64)> = None;
    loop {
        let node = tries % redis.urls.len();
        let url = &redis.urls[node];
        let subscribed = tokio::time::timeout(limit, async {
            let client = redis::Client::open(url.as_str())?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        match subscribed {
            Err(_) => tracing::debug!(
                node,
                "no answer in {limit:?} to listen for cache events; trying the next node"
            ),
            Ok(Err(e)) => {
                tracing::debug!(node, error = %e, "cannot listen for cache events; trying the next node")
            }
            Ok(Ok(pubsub)) => {
                backoff = FIRST_BACKOFF;
                // Read after subscribing: any purge after this is heard.
                let now = generation(&redis, &scope).await;
                if let Some((before, heard)) = last {
                    let missed = match (before, now) {
                        (Some(before), Some(now)) => now.checked_sub(before) != Some(heard),
                        _ => true,
                    };
                    if missed {
                        let cleared = store.clear();
                        tracing::warn!(
                            node,
                            cleared,
                            "listening for cache events again; purges were missed meanwhile, so the memory tier was cleared"
                        );
                    } else {
                        tracing::info!(node, "listening for cache events again; no purge was missed");
                    }
                }
                let mut heard = 0;
                let (mut sink, mut messages) = pubsub.split();
                let mut heartbeat =
                    tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
                let why = loop {
                    tokio::select! {
                        msg = messages.next() => match msg {
                            Some(msg) => heard += apply(&store, instance, now, &msg),
                            None => break "the connection closed",
                        },
                        _ = heartbeat.tick() => {
                            let pong = tokio::time::timeout(limit, sink.ping::<redis::Value>()).await;
                            if !matches!(pong, Ok(Ok(_))) {
                                break "no answer to a ping";
                            }
                        }
                    }
                };
                last = Some((now, heard));
                tracing::warn!(
                    node,
                    "stopped listening for cache events ({why}); missed purges are caught up once it listens again"
                );
            }
        }
        tries = tries.wrapping_add(1);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Applies one message; 1 for a purge of a generation after `since`, to count those heard.
fn apply(store: &Store, instance: u64, since: Option<u64>, msg: &redis::Msg) -> u64 {
    let Ok(payload) = msg.get_payload::<String>() else { return 0 };
    let Ok(m) = serde_json::from_str::<Message>(&payload) else { return 0 };
    // This pod's own purges count too.
    let counted = u64::from(m.generation.zip(since).is_some_and(|(g, since)| g > since));
    if m.from == instance {
        return counted;
    }
    for hash in m.invalidate {
        store.invalidate(hash);
    }
    let purged = store.purge_keys(&m.purge_keys) + store.purge_paths(&m.purge_paths);
    if purged > 0 {
        tracing::info!(purged, "cache purged by another pod");
    }
    counted
}

//! The shared cache tier in Redis, below each pod's memory: a new pod starts warm, N pods
//! missing the same URL make one request to the app (a lock in Redis: SET NX with a token
//! and a short expiry, released only by its owner), and purges and invalidations reach every
//! pod of the policy (pub/sub).
//!
//! A purge bumps the policy's generation in Redis, which retires every shared entry of the
//! policy at once (coarser than the memory tier, which purges by key and path, and always
//! correct). Pub/sub reaches the pods of single-node Redis; with a Redis Cluster the shared
//! tier and its lock work, and purges of other pods' memory wait for their entries to expire.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};

use super::{CacheKey, Entry, Store};
use crate::ratelimit::redis::RedisStore;

pub struct Shared {
    redis: Arc<RedisStore>,
    /// `namespace/policy`: entries of other policies are never seen.
    scope: String,
    /// Tells this pod's own messages from others'.
    instance: u64,
    subscriber: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(t) = &self.subscriber {
            t.abort();
        }
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

impl Shared {
    pub fn new(redis: Arc<RedisStore>, scope: String, store: Arc<Store>) -> Arc<Self> {
        let instance = fastrand::u64(..);
        let subscriber = (!redis.cluster).then(|| {
            let (redis, scope) = (redis.clone(), scope.clone());
            tokio::spawn(subscribe(redis, scope, instance, store))
        });
        Arc::new(Self { redis, scope, instance, subscriber })
    }

    /// Whether this tier is for `redis` and `scope` (kept across reloads that change neither).
    pub fn same(&self, redis: &Arc<RedisStore>, scope: &str) -> bool {
        Arc::ptr_eq(&self.redis, redis) && self.scope == scope
    }

    fn entry_key(&self, hash: u64) -> String {
        format!("apipolicy:cache:{{{}/{hash:016x}}}", self.scope)
    }

    fn lock_key(&self, hash: u64) -> String {
        format!("apipolicy:fill:{{{}/{hash:016x}}}", self.scope)
    }

    fn generation_key(&self) -> String {
        format!("apipolicy:generation:{{{}}}", self.scope)
    }

    fn channel(&self) -> String {
        channel(&self.scope)
    }

    async fn generation(&self) -> u64 {
        self.redis
            .command::<Option<u64>>(redis::cmd("GET").arg(self.generation_key()))
            .await
            .ok()
            .flatten()
            .unwrap_or(0)
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
        Some(super::entry(config, key, &request, status, headers, Bytes::from(stored.body), at))
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
                .headers
                .iter()
                .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                .collect(),
            request,
            stored_at_ms: epoch_ms(now),
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
        let bumped = self.redis.command::<u64>(redis::cmd("INCR").arg(self.generation_key())).await.is_ok();
        self.publish(Message {
            from: self.instance,
            purge_keys: keys.to_vec(),
            purge_paths: paths.to_vec(),
            ..Default::default()
        })
        .await;
        bumped
    }

    async fn publish(&self, message: Message) {
        let Ok(json) = serde_json::to_string(&message) else { return };
        let _: Result<i64, _> = self.redis.command(redis::cmd("PUBLISH").arg(self.channel()).arg(json)).await;
    }
}

fn channel(scope: &str) -> String {
    format!("apipolicy:events:{scope}")
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

/// Applies other pods' purges and invalidations to this pod's memory tier, reconnecting with
/// backoff when Redis goes away.
async fn subscribe(redis: Arc<RedisStore>, scope: String, instance: u64, store: Arc<Store>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let attempt = async {
            let client = redis::Client::open(redis.urls[0].as_str())?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(channel(&scope)).await?;
            let mut messages = pubsub.on_message();
            while let Some(msg) = messages.next().await {
                let Ok(payload) = msg.get_payload::<String>() else { continue };
                let Ok(m) = serde_json::from_str::<Message>(&payload) else { continue };
                if m.from == instance {
                    continue;
                }
                for hash in m.invalidate {
                    store.invalidate(hash);
                }
                let purged = store.purge_keys(&m.purge_keys) + store.purge_paths(&m.purge_paths);
                if purged > 0 {
                    tracing::info!(purged, "cache purged by another pod");
                }
            }
            Ok::<(), redis::RedisError>(())
        };
        if let Err(e) = attempt.await {
            tracing::debug!(error = %e, "cache event subscription lost; retrying");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

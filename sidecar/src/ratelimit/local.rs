//! The in-memory store of `scope: Pod` (and `Replicas`): per-key state in sharded maps, one
//! short lock per decision on one shard of many, O(1), and bounded in memory: idle keys are
//! forgotten (an idle key behaves exactly like a new one), and a shard that is full of busy
//! keys evicts some to stay under its bound.

use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
    sync::Mutex,
};

use apipolicy_api::Algorithm;

use super::algo::{self, Decision, Params, State};

const SHARDS: usize = 64;

/// Keys arrive already hashed with a random seed; hashing them again would be waste.
#[derive(Default)]
pub struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Map = HashMap<u64, State, BuildHasherDefault<IdentityHasher>>;

pub struct LocalStore {
    shards: Box<[Mutex<Map>]>,
    per_shard: usize,
    algorithm: Algorithm,
}

impl LocalStore {
    /// A store that holds at most about `max_keys` keys.
    pub fn new(algorithm: Algorithm, max_keys: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Map::default())).collect(),
            per_shard: (max_keys / SHARDS).max(16),
            algorithm,
        }
    }

    pub fn decide(&self, key: u64, params: &Params, now: u64) -> Decision {
        // The high bits pick the shard, the map uses all of them.
        let shard = &self.shards[(key >> 58) as usize % SHARDS];
        let mut map = shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let state = map.get(&key).copied();
        let (new, decision) = match self.algorithm {
            Algorithm::TokenBucket => algo::token_bucket(state, params, now),
            Algorithm::Gcra => algo::gcra(state, params, now),
            Algorithm::SlidingWindow => algo::sliding_window(state, params, now),
        };
        if state.is_none() && map.len() >= self.per_shard {
            make_room(&mut map, params, now, self.per_shard);
        }
        map.insert(key, new);
        decision
    }

    /// Forgets idle keys; run now and then so memory follows the keys in use.
    pub fn sweep(&self, params: &Params, now: u64) {
        for shard in self.shards.iter() {
            let mut map = shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            map.retain(|_, s| !s.idle(params, now));
        }
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().map(|m| m.len()).unwrap_or_default()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Drops idle keys; if the shard is still full, drops an eighth of it. Those keys start over,
/// which favours them slightly: the price of a memory bound under a flood of distinct keys.
fn make_room(map: &mut Map, params: &Params, now: u64, bound: usize) {
    map.retain(|_, s| !s.idle(params, now));
    if map.len() >= bound {
        let mut drop = bound / 8 + 1;
        map.retain(|_, _| {
            if drop > 0 {
                drop -= 1;
                false
            } else {
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_million_keys_stay_within_the_bound() {
        let store = LocalStore::new(Algorithm::TokenBucket, 100_000);
        let p = Params::new(10, 1_000, 10, 1);
        for key in 0..1_000_000u64 {
            store.decide(key.wrapping_mul(0x9E37_79B9_7F4A_7C15), &p, 1_000_000_000);
        }
        assert!(store.len() <= 100_000 + SHARDS, "{}", store.len());
        // A second later every key is idle and a sweep empties the store.
        store.sweep(&p, 2_000_000_000);
        assert!(store.is_empty());
    }

    #[test]
    fn keys_are_independent() {
        let store = LocalStore::new(Algorithm::Gcra, 1_000);
        let p = Params::new(1, 1_000, 1, 1);
        assert!(store.decide(1, &p, 0).allowed);
        assert!(!store.decide(1, &p, 0).allowed);
        assert!(store.decide(2, &p, 0).allowed);
    }
}

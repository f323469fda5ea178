//! Counts for the stats document and the metrics: keys, regions and clients from the server's
//! own tables, capacity (per namespace and per instance) from the eviction counters, pools
//! from the resource manager.

use std::collections::HashMap;

use maru_proto::stats::{ClientStats, EvictionStats, NamespaceStats, ServerStats};

use super::eviction::{namespace_of, usage_counts};
use super::{lock, ServerState};
use crate::registry::KeyRegistry;

impl ServerState {
    /// Counts that need no resource manager (for metrics and stats).
    pub fn local_stats(&self) -> ServerStats {
        let counts = self.registry.counts();
        let mut per_instance: HashMap<String, ClientStats> = HashMap::new();
        let (regions, region_bytes) = {
            let table = self.table();
            for r in table.by_slot.values() {
                let c = per_instance
                    .entry(r.instance_id.clone())
                    .or_insert_with(|| ClientStats {
                        instance_id: r.instance_id.clone(),
                        ..ClientStats::default()
                    });
                c.regions += 1;
                c.bytes += r.info.handle.len;
                let (keys, key_bytes, hits) = usage_counts(&r.usage);
                c.keys += keys;
                c.key_bytes += key_bytes;
                c.hits += hits;
            }
            (
                table.by_slot.len() as u64,
                table.by_slot.values().map(|r| r.info.handle.len).sum(),
            )
        };
        // Several sessions may share an instance id (a label): their connections, pins and
        // holds add up. Pins are the session's own (its leases), counted by namespace too.
        let mut pins_by_namespace: HashMap<String, u64> = HashMap::new();
        let sessions: Vec<_> = lock(&self.sessions)
            .values()
            .map(|rec| (rec.session.clone(), rec.connections))
            .collect();
        for (session, connections) in sessions {
            let id = &session.instance_id;
            let pins = lock(&session.leases).pins();
            let holds = lock(&session.holds).holds();
            *pins_by_namespace
                .entry(String::from_utf8_lossy(namespace_of(session.scope())).into_owned())
                .or_default() += pins;
            let c = per_instance
                .entry(id.clone())
                .or_insert_with(|| ClientStats {
                    instance_id: id.clone(),
                    ..ClientStats::default()
                });
            c.connected = true;
            c.connections += connections as u64;
            c.pins += pins;
            c.holds += holds;
        }
        for (id, e) in self.capacity.usage.evicted_by_instance() {
            let c = per_instance
                .entry(id.clone())
                .or_insert_with(|| ClientStats {
                    instance_id: id,
                    ..ClientStats::default()
                });
            c.evictions = e.keys;
            c.evicted_bytes = e.bytes;
        }
        let mut clients: Vec<ClientStats> = per_instance.into_values().collect();
        clients.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        ServerStats {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            keys: counts.keys,
            bytes: counts.bytes,
            pinned_keys: counts.pinned_keys,
            pins_expired: self.pins_expired.load(std::sync::atomic::Ordering::Relaxed),
            pages_parked: self.pages_parked(),
            pages_lane_kept: self.lane_kept() as u64,
            regions,
            region_bytes,
            clients,
            pools: Vec::new(),
            rm_error: None,
            ops: self.ops.snapshot(),
            eviction: self.eviction_stats(),
            namespaces: self.namespace_stats(&pins_by_namespace),
        }
    }

    fn eviction_stats(&self) -> EvictionStats {
        let cap = &self.capacity;
        let (mut evictions, mut evicted_bytes) = (0, 0);
        for ns in cap.usage.namespaces().values() {
            let c = ns.snapshot();
            evictions += c.evictions;
            evicted_bytes += c.evicted_bytes;
        }
        EvictionStats {
            policy: cap.policy_name().to_owned(),
            high: cap.config.high,
            low: cap.config.low,
            pool_bytes: cap.pool_bytes(),
            key_bytes: cap.key_bytes(),
            tracked_keys: cap.policy_len() as u64,
            evictions,
            evicted_bytes,
        }
    }

    /// Every namespace with counters or a quota; `pins` are the pins its sessions hold.
    fn namespace_stats(&self, pins: &HashMap<String, u64>) -> Vec<NamespaceStats> {
        let cap = &self.capacity;
        let mut names = cap.usage.namespaces();
        for name in cap.config.quotas.keys() {
            names
                .entry(name.clone())
                .or_insert_with(|| cap.usage.namespace(name));
        }
        names
            .into_iter()
            .map(|(name, ns)| {
                let c = ns.snapshot();
                NamespaceStats {
                    quota: cap.config.quotas.get(&name).copied(),
                    pins: pins.get(&name).copied().unwrap_or(0),
                    namespace: name,
                    keys: c.keys,
                    bytes: c.bytes,
                    hits: c.hits,
                    misses: c.misses,
                    evictions: c.evictions,
                    evicted_bytes: c.evicted_bytes,
                }
            })
            .collect()
    }

    /// Full stats, with the resource manager's pools (or why they are missing).
    pub fn stats(&self) -> ServerStats {
        let mut s = self.local_stats();
        match self.rm.stats() {
            Ok(rm) => s.pools = rm.pools,
            Err(e) => s.rm_error = Some(e.to_string()),
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use crate::state::fixtures::*;

    #[test]
    fn stats_count_keys_regions_and_clients() {
        let (st, _rm, (_p, a, r)) = state_with_owner("a");
        st.batch_register(&a, &[reg(b"x", &r, 0, 100), reg(b"y", &r, 4096, 50)])
            .unwrap();
        st.pin(&a, b"y").unwrap();
        let s = st.stats();
        assert_eq!((s.keys, s.bytes, s.pinned_keys), (2, 150, 1));
        assert_eq!((s.regions, s.region_bytes), (1, MIB));
        assert_eq!(s.clients.len(), 1);
        assert_eq!(
            (
                s.clients[0].connected,
                s.clients[0].connections,
                s.clients[0].regions
            ),
            (true, 1, 1)
        );
        assert_eq!(s.pools.len(), 1);
    }
}

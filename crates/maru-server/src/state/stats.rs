//! Counts for the stats document and the metrics: keys, regions and clients from the server's
//! own tables, pools from the resource manager.

use std::collections::HashMap;

use maru_proto::stats::{ClientStats, ServerStats};

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
            }
            (
                table.by_slot.len() as u64,
                table.by_slot.values().map(|r| r.info.handle.len).sum(),
            )
        };
        for (id, rec) in lock(&self.sessions).iter() {
            let c = per_instance
                .entry(id.clone())
                .or_insert_with(|| ClientStats {
                    instance_id: id.clone(),
                    ..ClientStats::default()
                });
            c.connected = true;
            c.connections = rec.connections as u64;
        }
        let mut clients: Vec<ClientStats> = per_instance.into_values().collect();
        clients.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        ServerStats {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            keys: counts.keys,
            bytes: counts.bytes,
            pinned_keys: counts.pinned_keys,
            regions,
            region_bytes,
            clients,
            pools: Vec::new(),
            rm_error: None,
            ops: self.ops.snapshot(),
        }
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
        let (st, _rm) = state(&[]);
        let (_p, a, _) = client(&st, "a");
        let r = st.request_region(&a, MIB).unwrap();
        st.batch_register(&a, &[reg(b"x", &r, 0, 100), reg(b"y", &r, 4096, 50)])
            .unwrap();
        st.pin(b"y");
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

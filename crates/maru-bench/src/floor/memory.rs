//! The memory floors: a raw memcpy into or out of a populated shared mapping, and the cost of
//! mapping a shm file with and without populating it.

use std::path::Path;
use std::time::Instant;

use maru_shm::{MapMode, Mapping};

use crate::stats::Samples;

/// memcpy of `chunk` bytes per sample into or out of a populated shared mapping of `region`
/// bytes (a fresh `/dev/shm` file under `dir`), page after page.
pub fn memcpy(
    dir: &Path,
    direction: &str,
    chunk: u64,
    region: u64,
    iters: usize,
) -> anyhow::Result<Samples> {
    let region = region.max(chunk);
    let path = dir.join(format!("floor-memcpy-{chunk}.shm"));
    let file = std::fs::File::create(&path)?;
    file.set_len(region)?;
    drop(file);
    let result = (|| {
        let m = Mapping::map(&path, 0, region, MapMode::ReadWrite, true)?;
        let pages = (region / chunk) as usize;
        let mut private = vec![0xc3_u8; chunk as usize];
        let mut samples = Samples::with_capacity(iters);
        for i in 0..iters + pages.min(8) {
            let at = (i % pages) * chunk as usize;
            let t = Instant::now();
            if direction == "into" {
                m.write_at(at, &private)?;
            } else {
                m.read_at(at, &mut private)?;
            }
            // The first few copies warm the code path, not the floor.
            if i >= pages.min(8) {
                samples.push(t.elapsed());
            }
        }
        std::hint::black_box(&private);
        Ok(samples)
    })();
    let _ = std::fs::remove_file(&path);
    result
}

/// Time to map `bytes` of a fresh shm file, with or without populating it.
pub fn map_cost(dir: &Path, populate: bool, bytes: u64, samples: usize) -> anyhow::Result<Samples> {
    let path = dir.join(format!("floor-map-{bytes}.shm"));
    let mut out = Samples::with_capacity(samples);
    let result = (|| {
        for _ in 0..samples.max(1) {
            // A fresh file every time: the pages a populate faults in are new tmpfs pages, as
            // they are for a region the resource manager just carved (it punches freed ranges).
            let _ = std::fs::remove_file(&path);
            std::fs::File::create(&path)?.set_len(bytes)?;
            let mode = if populate {
                MapMode::ReadWrite
            } else {
                MapMode::ReadOnly
            };
            let m = out.time(|| Mapping::map(&path, 0, bytes, mode, populate))?;
            drop(m);
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&path);
    result.map(|()| out)
}

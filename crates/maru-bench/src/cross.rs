//! Across processes: another instance (a worker process) owns a large region (1 GiB) and has
//! stored a chunk in it; a reader that has not mapped it yet retrieves the chunk. The first
//! retrieve maps the region lazily (no populate: mapping costs microseconds whatever the size),
//! then retrieves are steady state.

use std::time::Instant;

use anyhow::Context;

use crate::context::Bench;
use crate::floor::Transport;
use crate::plan::{keys, GIB, KIB};
use crate::rows::handler;
use crate::stats::{Row, Samples};
use crate::worker::{Spec, Worker};

pub fn run(b: &mut Bench, t: Transport, url: &str) -> anyhow::Result<()> {
    let region = GIB;
    let key = keys(1).remove(0);
    let spec = Spec::Hold {
        url: url.to_owned(),
        region,
        chunk: 4 * KIB,
        keys: vec![String::from_utf8_lossy(&key).into_owned()],
    };
    let mut writer = Worker::spawn(&b.launcher, &spec)?;
    writer.expect_ready()?;

    let mut first = Samples::with_capacity(b.plan.cross_samples);
    let mut steady = Samples::with_capacity(b.plan.iters);
    for i in 0..b.plan.cross_samples {
        // A fresh reader each time: its own mappings, none of the writer's region yet.
        let reader = handler(url, 4 * KIB, 2 << 20, false)?;
        let t0 = Instant::now();
        let view = reader
            .retrieve(&key)?
            .context("the writer's key is missing")?;
        first.push(t0.elapsed());
        if view.is_writable() {
            anyhow::bail!("another instance's chunk came back writable");
        }
        if i + 1 == b.plan.cross_samples {
            for _ in 0..b.plan.iters {
                steady.time(|| reader.retrieve(&key))?;
            }
        }
        drop(view);
        reader.close();
    }
    writer.finish()?;
    b.push(
        t,
        Row::new(
            "first_retrieve_1gib",
            t.name(),
            4 * KIB,
            1,
            &first.summary(),
        )
        .note("another process's 1 GiB region, mapped lazily by the first retrieve"),
    );
    b.push(
        t,
        Row::new("retrieve_1gib", t.name(), 4 * KIB, 1, &steady.summary())
            .note("steady state after the first retrieve from another process's 1 GiB region"),
    );
    Ok(())
}

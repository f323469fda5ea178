//! Rust quick start: store chunks zero-copy and read them back through views.
//!
//! Usage: `rust-quickstart [SERVER_URL]` (default `tcp://localhost:5555`).

use maru_client::{DeleteStatus, MaruConfig, MaruHandler};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server_url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "tcp://localhost:5555".into());
    let handler = MaruHandler::new(MaruConfig {
        server_url,
        pool_size: 8 << 20,
        chunk_size_bytes: 64 << 10,
        ..MaruConfig::default()
    })?;
    handler.connect()?;

    // Zero copy: write straight into a shared-memory page, then register the key.
    let chunk = vec![7u8; 64 << 10];
    for i in 0..4 {
        let handle = handler.alloc(chunk.len() as u64)?;
        handle.write_at(0, &chunk)?;
        handle.write_at(0, format!("chunk-{i}").as_bytes())?;
        handler.store_handle(format!("rust-quickstart-{i}").as_bytes(), &handle)?;
    }
    // Or copy in: alloc + copy + register in one call, with an optional prefix.
    handler.store_bytes(b"rust-quickstart-extra", b"header:", b"payload")?;

    // A retrieve returns a view into the mapping, not a copy.
    let view = handler
        .retrieve(b"rust-quickstart-2")?
        .ok_or("key missing")?;
    println!(
        "retrieved {} bytes starting with {:?}",
        view.len(),
        String::from_utf8_lossy(&view.to_vec()[..7])
    );
    println!("exists: {}", handler.exists(b"rust-quickstart-extra")?);

    let mut deleted = 0;
    for i in 0..4 {
        if handler.delete(format!("rust-quickstart-{i}").as_bytes())? == DeleteStatus::Deleted {
            deleted += 1;
        }
    }
    handler.delete(b"rust-quickstart-extra")?;
    println!("deleted {deleted} chunks + 1");
    handler.close();
    Ok(())
}

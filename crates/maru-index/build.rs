// `cfg(loom)` selects the model-checked build of the entry protocol (tests/loom.rs).
fn main() {
    println!("cargo::rustc-check-cfg=cfg(loom)");
}

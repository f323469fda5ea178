//! `maru-resource-manager`: see [`maru_resource_manager::cli`].

fn main() {
    std::process::exit(maru_resource_manager::cli::main(std::env::args().collect()));
}

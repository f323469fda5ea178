//! `maru-resource-manager`: see [`maru_rm::cli`].

fn main() {
    std::process::exit(maru_rm::cli::main(std::env::args().collect()));
}

fn main() {
    std::process::exit(maru_server::cli::main(std::env::args().collect()));
}

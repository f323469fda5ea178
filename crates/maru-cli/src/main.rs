fn main() {
    std::process::exit(maru_cli::run(std::env::args().collect()));
}

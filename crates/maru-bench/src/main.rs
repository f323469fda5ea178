fn main() {
    std::process::exit(maru_bench::main(std::env::args().collect()));
}

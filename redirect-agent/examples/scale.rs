//! Runs the node-scale harness (`redirect_agent::reconcile::scale`) at the issue #13 size against
//! the in-memory maps and prints one line of figures: `cargo run --release --example scale`.
fn main() {
    let report = redirect_agent::reconcile::scale::run(&Default::default());
    println!("{report}");
}

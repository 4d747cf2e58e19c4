//! The pure multiplication rate on one thread: the ceiling for `/rec` throughput per core.
//!
//! `cargo run --release --example mul_rate -- [SECONDS]` prints one line: `mul_per_second <N>`.
use std::time::{Duration, Instant};

use tang_p521::ExchangeKey;

// A valid key (d, x, y) and a client point, fixed so runs are comparable.
include!("../tests/support/vectors.rs");

fn main() {
    let seconds: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let key = ExchangeKey::new(&KEY_D, &KEY_X, &KEY_Y).expect("valid key");
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs_f64(seconds) {
        for _ in 0..20 {
            std::hint::black_box(key.exchange(&KEY_X, &KEY_Y).expect("valid point"));
        }
        n += 20;
    }
    println!(
        "mul_per_second {:.1}",
        n as f64 / start.elapsed().as_secs_f64()
    );
}

//! The baselines the production path is compared with, each served by this binary as a
//! process of its own on the server CPU, with one tokio worker like the server:
//! - `grpc`: the bare tonic echo (`baseline`) and the raw-sqlx insert RPC (`baseline-insert`);
//! - `payme`: the bare axum Payme handler doing the same queries (`baseline-payme`);
//! - `pool`: raw sqlx pools opened like the server's.

pub mod grpc;
pub mod payme;
pub mod pool;

/// Says where the baseline listens, the way the server does (a JSON line on standard error).
fn announce(addr: std::net::SocketAddr) {
    eprintln!(
        "{}",
        serde_json::json!({"local_addr": addr.to_string(), "level": "INFO"})
    );
}

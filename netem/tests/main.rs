//! Integration tests of pgcourier-netem on loopback: the relays, the control
//! port and the binary. Every wait has a deadline that names what it awaited.

mod cli;
mod tcp;
mod udp;

use std::future::Future;
use std::time::Duration;

/// Await `fut`, failing the test with `what` if it takes longer than `limit`.
pub async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// Poll `condition` every 5 ms until it holds, failing with `what` after `limit`.
pub async fn wait_for(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    within(limit, what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// A spawned server task, aborted when the test drops it.
pub struct Server(pub tokio::task::JoinHandle<()>);

impl Drop for Server {
    fn drop(&mut self) {
        self.0.abort();
    }
}

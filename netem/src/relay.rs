//! The handle of a running relay (UDP or TCP): where it listens, its
//! [`LinkControl`], and its tasks, which stop when it is shut down or dropped.

use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::link::{LinkControl, LinkStats};
use crate::model::ParamError;

/// Why a relay or control port could not start.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("invalid link parameters")]
    Params(#[from] ParamError),
    #[error("bind {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running relay. Dropping it cancels its tasks (they stop at their next
/// await); [`RelayHandle::shutdown`] also waits for them.
pub struct RelayHandle {
    control: LinkControl,
    local_addr: SocketAddr,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl RelayHandle {
    pub(crate) fn new(
        control: LinkControl,
        local_addr: SocketAddr,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) -> Self {
        RelayHandle {
            control,
            local_addr,
            cancel,
            tracker,
        }
    }

    /// The address clients send to (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Commanded outage of both directions.
    pub fn set_down(&self, down: bool) {
        self.control.set_down(down);
    }

    pub fn stats(&self) -> LinkStats {
        self.control.stats()
    }

    /// A clonable handle on the link, for a control port or another task.
    pub fn control(&self) -> LinkControl {
        self.control.clone()
    }

    /// Stop every task of the relay and wait until they have ended. Datagrams
    /// and stream data still in flight are discarded.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

//! HTTP/2 tuning shared by storaged's server defaults and every client:
//! large frames and windows so one stream can carry a device's bandwidth
//! without waiting on WINDOW_UPDATEs, and keepalives that notice a dead
//! peer within a minute.

use std::time::Duration;

/// Largest frame either side sends (the HTTP/2 maximum).
pub const MAX_FRAME_BYTES: u32 = (1 << 24) - 1;
/// Flow-control window of one stream.
pub const STREAM_WINDOW_BYTES: u32 = 32 << 20;
/// Flow-control window of one connection (all its streams).
pub const CONNECTION_WINDOW_BYTES: u32 = 64 << 20;
/// Idle time after which a PING checks the peer.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// Time a PING may go unanswered before the connection is dropped.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Time a client waits for a connection to open.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

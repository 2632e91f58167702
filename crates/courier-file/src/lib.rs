//! `file://PATH`: Courier's default backend. The embedded durable log
//! ([`courier_log`]) stores topics and group offsets in `PATH`; [`courier_local`]'s
//! driver adds key hashing, consumer groups and commits on top.
//!
//! Durability follows the topic's fsync policy (`fsync` topic setting, or the URL's
//! `?fsync=` for topics created implicitly): `always` — an acknowledged send survives
//! `kill -9` and power loss (group commit); `interval:MS` (default 1000) — survives
//! `kill -9`, power loss loses at most the last interval; `never` — survives `kill -9`
//! only.
//!
//! One process owns a directory (a lock file refuses a second); within a process,
//! every client connecting to the same path shares one open log.

mod store;

use std::sync::Arc;

use courier_core::{Config, Driver, Error, Result};
use courier_local::LogDriver;

pub use store::{FilePartition, FileStore};

/// The `file://` driver.
pub type FileDriver = LogDriver<FileStore>;

/// Opens (or joins, within this process) the log named by a `file://PATH[?fsync=…]`
/// URL's remainder.
pub async fn connect(rest: &str, config: &Config) -> Result<Arc<dyn Driver>> {
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() {
        return Err(Error::InvalidUrl {
            url: format!("file://{rest}"),
            reason: "a directory is required, e.g. file://./data".into(),
        });
    }
    let mut fsync = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("fsync", v)) => fsync = Some(store::parse_fsync(v)?),
            _ => {
                return Err(Error::InvalidUrl {
                    url: format!("file://{rest}"),
                    reason: format!("unknown parameter {pair:?} (supported: fsync)"),
                })
            }
        }
    }
    let store = FileStore::open_shared(path, fsync, config.max_message_size).await?;
    Ok(Arc::new(LogDriver::new(store, config.default_partitions)))
}

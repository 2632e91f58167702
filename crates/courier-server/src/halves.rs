//! Which token prepared which half message through this server, so only that token
//! (or an admin) may commit or roll it back. Kept in memory: after a restart only an
//! admin token may decide older halves (undecided ones are rolled back by check-back).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Entries older than this are dropped when the table is large: by then the
/// scheduler's check-back has settled the half anyway.
const FORGET_AFTER: Duration = Duration::from_secs(3600);
/// Size above which old entries are pruned on insert.
const PRUNE_ABOVE: usize = 100_000;

/// Half id → preparing token name.
#[derive(Default)]
pub struct Halves {
    owners: Mutex<HashMap<String, (String, Instant)>>,
}

impl Halves {
    /// Remembers that token `owner` prepared half `id`.
    pub fn prepared(&self, id: &str, owner: &str) {
        let mut owners = self.owners.lock();
        if owners.len() >= PRUNE_ABOVE {
            owners.retain(|_, (_, at)| at.elapsed() < FORGET_AFTER);
        }
        owners.insert(id.to_string(), (owner.to_string(), Instant::now()));
    }

    /// The token that prepared `id`, if this server remembers it.
    pub fn owner(&self, id: &str) -> Option<String> {
        self.owners.lock().get(id).map(|(o, _)| o.clone())
    }

    /// Forgets `id` once it is decided.
    pub fn decided(&self, id: &str) {
        self.owners.lock().remove(id);
    }
}

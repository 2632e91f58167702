//! HTTP handlers, one module per resource.

pub mod consume;
pub mod dead_letters;
pub mod groups;
pub mod health;
pub mod messages;
pub mod monitoring;
pub mod topics;
pub mod transactions;

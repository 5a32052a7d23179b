//! The Testflinger agent as a library: the binary in `main.rs` is a thin
//! shell over these modules; the fuzz targets in `fuzz/` call them directly.
//!
//! Data flows one way: config → agent → job → runner → output → client.

pub mod agent;
pub mod archive;
pub mod atomic;
pub mod attachments;
pub mod budget;
pub mod client;
pub mod config;
pub mod delivery;
pub mod events;
pub mod jitter;
pub mod job;
pub mod json;
pub mod lockfile;
pub mod logging;
pub mod mask;
pub mod metrics;
pub mod notify;
pub mod outbound;
pub mod output;
pub mod phase;
pub mod recovery;
pub mod rundir;
pub mod runner;
pub mod safe_fs;
pub mod serial;
pub mod signals;
pub mod timestamp;
pub mod vitals;

//! The Testflinger agent as a library: the binary in `main.rs` is a thin
//! shell over these modules; the fuzz targets in `fuzz/` (and
//! `tests/it/regressions.rs`) call a few of them directly.
//!
//! Only the modules `main` and the fuzz targets use are public; the rest are
//! the crate's own. Calls go config → agent → job → runner; the runner hands
//! output back up to the job's watcher, which sends it through the client
//! while the phase runs (see docs/architecture.md).
// `pub` only where `main`, the fuzz targets or the tests reach it; narrowing
// casts are checked or allowed with the bound that makes them safe (lengths
// and sizes from the network and the job flow through them).
#![warn(unreachable_pub, clippy::cast_possible_truncation)]
// Test code casts values it made itself; the lint holds for the code shipped
// (clippy --all-targets checks the library built without tests too).
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

// Used by `main`.
pub mod agent;
pub mod human;
pub mod job;
pub mod lockfile;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod retry;
pub mod runner;
pub mod safe_fs;
pub mod server;
pub mod signals;

// Used by the fuzz targets (client, config and json by `main` too).
pub mod attachments;
pub mod client;
pub mod config;
pub mod json;
pub mod mask;
// In the client's answers.
pub mod states;

pub(crate) mod archive;
pub(crate) mod atomic;
pub(crate) mod deadline;
pub(crate) mod delivery;
pub(crate) mod events;
pub(crate) mod jitter;
pub(crate) mod outbound;
pub(crate) mod output;
pub(crate) mod phase;
pub(crate) mod recovery;
pub(crate) mod rundir;
pub(crate) mod serial;
pub(crate) mod timestamp;
pub(crate) mod vitals;
pub(crate) mod wait;

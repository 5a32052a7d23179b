//! Exit codes with a meaning shared by several modules (the job, its
//! recovery after a crash, the metrics): kept apart so that none of them
//! has to import another for a number.

/// The exit code device connectors use for "the device could not be recovered".
pub const RECOVERY_FAILED: i32 = 46;

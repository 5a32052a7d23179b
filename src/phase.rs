//! The words of a job: its phases, why it ended, the events it emits, the
//! two kinds of log it streams, and the exit codes with a meaning. Each is
//! spelled as a string once, here, for the wire and the run dir; everywhere
//! else they are these types.

use std::fmt;

/// The exit code device connectors use for "the device could not be recovered".
pub(crate) const RECOVERY_FAILED: i32 = 46;
/// The status recorded for a phase that was running when the agent was
/// killed or lost power: its real exit status is unknown. Chosen outside
/// the codes connectors use (0-2, 46) and [`NOT_RUN`].
pub(crate) const INTERRUPTED_BY_AGENT_LOSS: i32 = 99;
/// The status of a phase whose command could not start (or whose setup,
/// the attachments, failed before any command ran).
pub(crate) const NOT_RUN: i32 = 100;

/// A phase of a job, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    Setup,
    Provision,
    FirmwareUpdate,
    Test,
    Allocate,
    Reserve,
    Cleanup,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 7] = [
        Phase::Setup,
        Phase::Provision,
        Phase::FirmwareUpdate,
        Phase::Test,
        Phase::Allocate,
        Phase::Reserve,
        Phase::Cleanup,
    ];
    /// The phases before cleanup, in order (cleanup runs whatever happened).
    pub const BEFORE_CLEANUP: [Phase; 6] =
        [Phase::Setup, Phase::Provision, Phase::FirmwareUpdate, Phase::Test, Phase::Allocate, Phase::Reserve];

    /// The name on the wire, in the config (`<phase>_command`), the job
    /// (`<phase>_data`) and the run dir (`<phase>.log`).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Setup => "setup",
            Phase::Provision => "provision",
            Phase::FirmwareUpdate => "firmware_update",
            Phase::Test => "test",
            Phase::Allocate => "allocate",
            Phase::Reserve => "reserve",
            Phase::Cleanup => "cleanup",
        }
    }

    pub fn parse(name: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.as_str() == name)
    }

    /// The job's key holding this phase's data.
    pub fn data_key(self) -> String {
        format!("{}_data", self.as_str())
    }

    /// A cancel on the server stops this phase at once (upstream: not
    /// provisioning, which would leave the device half flashed, nor cleanup).
    pub fn can_cancel(self) -> bool {
        !matches!(self, Phase::Provision | Phase::Cleanup)
    }

    /// The job's data for this phase may carry `attachments` entries, and
    /// the attachments archive has a folder for it.
    pub fn takes_attachments(self) -> bool {
        matches!(self, Phase::Provision | Phase::FirmwareUpdate | Phase::Test)
    }

    /// Setup and cleanup run on the command alone; the others need data.
    pub fn needs_data(self) -> bool {
        !matches!(self, Phase::Setup | Phase::Cleanup)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// Why a job ended: the `job_end` event's detail and the `--job` summary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    NormalExit,
    /// The phase failed (or, for setup, could not be prepared).
    Fail(Phase),
    /// A phase exited with [`RECOVERY_FAILED`].
    RecoveryFail,
    Cancelled,
    /// The agent was told to stop (SIGTERM, SIGINT).
    AgentInterrupted,
    GlobalTimeout,
    OutputTimeout,
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            EndReason::NormalExit => f.write_str("normal_exit"),
            EndReason::Fail(p) => write!(f, "{p}_fail"),
            EndReason::RecoveryFail => f.write_str("recovery_fail"),
            EndReason::Cancelled => f.write_str("cancelled"),
            EndReason::AgentInterrupted => f.write_str("agent_interrupted"),
            EndReason::GlobalTimeout => f.write_str("global_timeout"),
            EndReason::OutputTimeout => f.write_str("output_timeout"),
        }
    }
}

/// An event of the job, as posted for its webhook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    JobStart,
    JobEnd,
    Start(Phase),
    Success(Phase),
    /// `<phase>_fail`, `cancelled`, `recovery_fail`, a timeout...: the
    /// event names of the end reasons.
    Ended(EndReason),
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Event::JobStart => f.write_str("job_start"),
            Event::JobEnd => f.write_str("job_end"),
            Event::Start(p) => write!(f, "{p}_start"),
            Event::Success(p) => write!(f, "{p}_success"),
            Event::Ended(r) => r.fmt(f),
        }
    }
}

/// The two logs a phase streams: its command's output, and the
/// connector's serial log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LogKind {
    Output,
    Serial,
}

impl LogKind {
    /// The name in `log/<kind>` and in the saved delivery state.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LogKind::Output => "output",
            LogKind::Serial => "serial",
        }
    }

    pub(crate) fn parse(name: &str) -> Option<LogKind> {
        [LogKind::Output, LogKind::Serial].into_iter().find(|k| k.as_str() == name)
    }
}

impl fmt::Display for LogKind {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_phases_are_ordered() {
        for p in Phase::ALL {
            assert_eq!(Phase::parse(p.as_str()), Some(p));
        }
        assert_eq!(Phase::parse("firmware_update"), Some(Phase::FirmwareUpdate));
        assert_eq!(Phase::parse("Test"), None);
        assert!(Phase::ALL.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(&Phase::ALL[..6], &Phase::BEFORE_CLEANUP);
        for k in [LogKind::Output, LogKind::Serial] {
            assert_eq!(LogKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(LogKind::parse("stderr"), None);
    }

    #[test]
    fn event_and_reason_names_are_upstreams() {
        let names = [
            (Event::Ended(EndReason::Fail(Phase::FirmwareUpdate)), "firmware_update_fail"),
            (Event::Ended(EndReason::RecoveryFail), "recovery_fail"),
            (Event::Ended(EndReason::NormalExit), "normal_exit"),
            (Event::Ended(EndReason::AgentInterrupted), "agent_interrupted"),
            (Event::Start(Phase::Setup), "setup_start"),
            (Event::Success(Phase::Cleanup), "cleanup_success"),
            (Event::JobEnd, "job_end"),
        ];
        for (event, name) in names {
            assert_eq!(event.to_string(), name);
        }
    }
}

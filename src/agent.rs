//! The polling loop: wait for the server, honour the state operators set
//! on it, deliver what earlier jobs left behind, take a job, run it.

use std::time::Instant;

use crate::client::{Client, ClientError};
use crate::config::Config;
use crate::delivery;
use crate::human;
use crate::jitter;
use crate::job::JobRunner;
use crate::json::Json;
use crate::metrics::Metrics;
use crate::notify;
use crate::recovery;
use crate::retry::Backoff;
use crate::signals;
use crate::states::AgentState;
use crate::wait::{self, Ends};

mod disk;
mod posts;

/// Failed delivery rounds of kept outcomes that hold back new jobs. A
/// server that is away gives no job anyway; one that answers everything
/// but one outcome (a server bug for that document, say) must not take the
/// device out of the fleet: after this many rounds jobs are taken again
/// (upstream never holds them back), and the outcomes are still retried.
const KEPT_HOLDS_INTAKE: u32 = 3;

/// Why the loop ended; `main` maps it to an exit status.
#[derive(Debug, PartialEq)]
pub enum Exit {
    /// SIGTERM/SIGINT: the current job was wound down first.
    Stopped,
    /// `--once`: one polling cycle is done (a job was run, or none offered).
    Once,
    /// The server (state `restart`) or SIGUSR1 asked for a restart.
    Restart,
    /// `--once`, and the server stayed unreachable for `server_timeout`.
    Unreachable,
}

/// How the comment of the `offline` state posted before a restart begins;
/// at the next start, such an `offline` is ours to clear.
const RESTARTING: &str = "Restarting: ";

pub struct Agent<'a> {
    config: &'a Config,
    client: Client,
    once: bool,
    /// Set after a phase exited 46: no job is taken until an operator
    /// changes the agent's state on the server.
    recovery_failed: bool,
    /// The `offline` state after a recovery failure still has to reach
    /// the server (the post failed).
    offline_unposted: Option<Json>,
    metrics: Metrics,
    /// When we last posted our state, for the heartbeat.
    last_post: Instant,
    /// The server state last seen, to log changes once rather than per poll.
    last_state: AgentState,
    /// A restart (SIGUSR1) is waiting for an operator's hold, and the log
    /// has said so.
    restart_waits: bool,
    /// Kept outcomes failed to go: the next attempt waits, doubling per
    /// failure (not every polling cycle).
    kept: Backoff,
    /// Why the server was last found unreachable (a short kind), to log
    /// each change of reason once rather than every attempt.
    unreachable: Option<&'static str>,
    /// Free space under execution_basedir was below `min_free_mb` at the
    /// last look: said once (log, state comment) until it returns.
    disk_low: bool,
    /// The state comment saying so, until the server has it.
    disk_comment_unposted: Option<String>,
    /// `waiting` was not posted because the state could not be read; the
    /// next cycle that reads it posts it, unless an operator holds the agent.
    waiting_unposted: bool,
}

impl<'a> Agent<'a> {
    pub fn new(config: &'a Config, client: Client, once: bool, metrics: Metrics) -> Agent<'a> {
        Agent {
            config,
            client,
            once,
            recovery_failed: false,
            offline_unposted: None,
            metrics,
            last_post: Instant::now(),
            last_state: AgentState::Other(String::new()),
            restart_waits: false,
            kept: Backoff::new(config.schedules().kept),
            unreachable: None,
            disk_low: false,
            disk_comment_unposted: None,
            waiting_unposted: false,
        }
    }

    /// Posts the agent's data; one the server took counts for the heartbeat.
    fn post_data(&mut self, data: &Json) -> Result<(), ClientError> {
        let posted = self.client.post_agent_data(data);
        if posted.is_ok() {
            self.last_post = Instant::now();
        }
        posted
    }

    /// Waits until the server answers. Returns false when `--once` gives
    /// up: it waits no longer than `server_timeout`.
    fn wait_for_server(&mut self) -> bool {
        let started = Instant::now();
        let give_up_after = self.config.server_timeout();
        let schedule = self.config.schedules().server_wait;
        let mut backoff = Backoff::new(schedule);
        loop {
            if signals::interrupted() {
                return true;
            }
            let reason = match self.client.reachability() {
                Ok(()) => {
                    if self.unreachable.take().is_some() {
                        log::info!("server {} reachable again", self.client.base_url());
                    }
                    // After an outage the first request waits a random part
                    // of it (the client says how long), like those of the
                    // agents that were running jobs: the fleet's first polls,
                    // and the jobs they take, do not all start at the return.
                    if let Some(hold) = self.client.held_for() {
                        self.client.before_wait(hold);
                        wait::until(crate::deadline::from_now(hold), Some(&mut self.metrics), None, Ends::Stop);
                    }
                    return true;
                }
                Err(reason) => reason,
            };
            // A stop while the server is away just stops: not a word about
            // the server, and no start-up registration after.
            if signals::interrupted() {
                return true;
            }
            // Never past the client's outage hold: an idle agent notices the
            // return no later than one running a job (the backoff alone,
            // doubling to 3 min, brought some back 2 min after the server).
            let wait = backoff.failed(Instant::now());
            let wait = self.client.held_for().map_or(wait, |hold| wait.min(hold));
            notify::status(&format!("offline: server {} not reachable", self.client.base_url()));
            let kind = crate::client::unreachable_kind(&reason);
            if self.unreachable != Some(kind) {
                log::warn!(
                    "server {} not reachable: {}; waits doubling up to {}, retrying in {}",
                    self.client.base_url(),
                    crate::client::unreachable_text(&reason),
                    human::duration(schedule.max),
                    human::duration(wait)
                );
                self.unreachable = Some(kind);
            } else {
                log::debug!("server still not reachable ({reason}), retrying in {}", human::duration(wait));
            }
            if self.once && started.elapsed().saturating_add(wait) > give_up_after {
                log::error!(
                    "--once: server {} not reachable for {}; giving up",
                    self.client.base_url(),
                    human::duration(started.elapsed())
                );
                return false;
            }
            self.client.before_wait(wait);
            wait::until(crate::deadline::from_now(wait), Some(&mut self.metrics), None, Ends::Stop);
        }
    }

    fn announce(&mut self) {
        let c = self.config;
        // No `job_id` here (upstream posts none at start-up): a job left
        // by a killed agent is resumed by `recovery`, which clears it after.
        let mut data =
            Json::object().with("queues", Json::Array(c.job_queues().iter().map(|q| Json::str(q.as_str())).collect()));
        // As upstream: location and provision_type always ("" when unset),
        // identifier only when set.
        data.set("location", Json::str(c.location().unwrap_or("")));
        data.set("provision_type", Json::str(c.provision_type().unwrap_or("")));
        if let Some(id) = c.identifier() {
            data.set("identifier", Json::str(id));
        }
        // Unlike upstream, a restart does not overwrite a state an operator
        // set on the server: an agent in maintenance stays in maintenance.
        // The `offline` this agent posts itself when it restarts is not kept.
        let mut posts_waiting = false;
        match self.client.held_state() {
            Ok(Some((state, comment))) if !comment.starts_with(RESTARTING) => {
                log::info!("the server has this agent {state}; keeping that state")
            }
            Ok(_) => {
                AgentState::Waiting.set_in(&mut data, "");
                posts_waiting = true;
            }
            Err(e) => self.owe_waiting(&e),
        }
        match self.post_data(&data) {
            Ok(()) => {}
            Err(e) if e.is_stop() => return,
            Err(e) => {
                log::error!("cannot post agent data: {e}");
                // Owed: else our own `offline` of a restart would read as
                // an operator's hold at every cycle, and no job be taken.
                self.waiting_unposted |= posts_waiting;
            }
        }
        if let Some(images) = c.advertised_images() {
            if let Err(e) = self.client.post_images(images).filter_stop() {
                log::error!("cannot post advertised images: {e}");
            }
        }
    }

    /// The queues to ask for: all of ours, or only those `restricted_to`
    /// names when it names any of ours with owners.
    fn queues(&self, agent_data: Option<&Json>) -> Vec<String> {
        let restricted: Vec<String> = agent_data
            .and_then(|d| d.get("restricted_to"))
            .and_then(Json::as_object)
            .unwrap_or(&[])
            .iter()
            .filter(|(q, owners)| !owners.is_empty_like() && self.config.job_queues().contains(q))
            .map(|(q, _)| q.clone())
            .collect();
        if restricted.is_empty() { self.config.job_queues().to_vec() } else { restricted }
    }

    pub fn run(&mut self) -> Exit {
        if !self.wait_for_server() {
            return Exit::Unreachable;
        }
        if signals::interrupted() {
            return Exit::Stopped;
        }
        self.announce();
        if signals::interrupted() {
            return Exit::Stopped;
        }
        // Jobs a killed agent left behind are finished before any new one.
        recovery::recover(self.config, &mut self.client, &mut self.metrics);
        loop {
            if signals::interrupted() {
                return Exit::Stopped;
            }
            // A restart the cycle saw and did not do waits for an operator's
            // hold to be lifted: the next cycle comes at the usual pace. One
            // asked for during the cycle (a job) is looked at right away.
            let restart_seen = signals::restart_requested();
            if let Some(exit) = self.cycle() {
                return exit;
            }
            if self.once {
                return Exit::Once;
            }
            // ±20 %: agents started together drift apart within a few polls.
            // Kept outcomes go when their own (full-jitter) wait is over,
            // not at the next poll: that would bring back in step a fleet
            // whose jobs ended together.
            let mut wait = jitter::spread(self.config.schedules().poll);
            if let Some(due) = self.kept.next() {
                wait = wait.min(due.saturating_duration_since(Instant::now()));
            }
            if let Some(held) = self.client.held_for() {
                wait = wait.max(held);
            }
            log::debug!("next poll in {}", human::duration(wait));
            let ends = if restart_seen { Ends::Stop } else { Ends::StopOrRestart };
            self.client.before_wait(wait);
            wait::until(crate::deadline::from_now(wait), Some(&mut self.metrics), None, ends);
        }
    }

    /// One polling cycle; `Some` ends the loop.
    fn cycle(&mut self) -> Option<Exit> {
        // Undelivered outcomes hold back jobs, not a restart: they stay on
        // disk for the restarted agent.
        let restart = signals::restart_requested();
        // Calls held back by an outage would fail at once: no probe, no
        // error per cycle, and `run` sleeps until the hold is over.
        if let Some(left) = self.client.held_for().filter(|_| !restart) {
            log::debug!("requests held back for {} more; not polling", human::duration(left));
            return None;
        }
        let holds_intake = |kept: &Backoff| kept.failures() < KEPT_HOLDS_INTAKE;
        if !self.kept.ready(Instant::now()) {
            if !restart && holds_intake(&self.kept) {
                return None;
            }
        } else if self
            .client
            .all_later(|c| delivery::deliver_kept(c, self.config.results_basedir(), self.config.execution_basedir()))
        {
            self.kept.succeeded();
        } else if !restart && self.client.returning_for().is_some() {
            // Its first call ended an outage: the rest wait out the hold that
            // follows, and `run` sleeps until it is over. Not a failed round
            // (one the server failed is, outage or not: else an outcome it
            // keeps failing would hold back intake for good).
            return None;
        } else {
            if signals::interrupted() {
                return Some(Exit::Stopped);
            }
            let wait = self.kept.failed(Instant::now());
            if holds_intake(&self.kept) {
                log::warn!(
                    "earlier outcomes are still undelivered; not taking a job; trying again in {}",
                    human::duration(wait)
                );
                notify::status("earlier outcomes undelivered; not taking jobs");
                if !restart {
                    return None;
                }
            } else if self.kept.failures() == KEPT_HOLDS_INTAKE {
                log::warn!(
                    "earlier outcomes still undelivered after {KEPT_HOLDS_INTAKE} tries; taking jobs meanwhile (they stay on disk and are tried again in {}, then between jobs)",
                    human::duration(wait)
                );
            } else {
                log::debug!("earlier outcomes still undelivered; trying again in {}", human::duration(wait));
            }
        }
        let agent_data = match self.client.get_agent_data() {
            // An answer that ended an outage holds the next calls back (see
            // `Outage::answered`): `run` sleeps until the poll may go.
            Ok(_) if !restart && self.client.held_for().is_some() => return None,
            Ok(d) => d,
            Err(e) if e.is_stop() => return Some(Exit::Stopped),
            Err(e) => {
                log::error!("cannot read agent data: {e}");
                if !self.client.is_reachable() && !self.wait_for_server() {
                    return Some(Exit::Unreachable);
                }
                return None;
            }
        };
        let (state, comment) = AgentState::of(agent_data.as_ref().unwrap_or(&Json::Null));
        if let Some(offline) = self.offline_unposted.take() {
            if let Err(e) = self.post_data(&offline) {
                if !e.is_stop() {
                    log::warn!("cannot post the offline state yet: {e}");
                }
                self.offline_unposted = Some(offline);
            }
            return None;
        }
        if self.waiting_unposted {
            self.post_owed_waiting(&state, &comment);
        }
        self.heartbeat(agent_data.as_ref(), &state, &comment);
        let changed = state != self.last_state;
        self.last_state = state.clone();
        match &state {
            AgentState::Restart => {
                log::info!("the server asks for a restart ({comment}); exiting while idle");
                self.post_restarting(&format!("restart requested from the server ({comment})"));
                return Some(Exit::Restart);
            }
            AgentState::Offline | AgentState::Maintenance => {
                notify::status(&format!("{state} on the server: {comment}"));
                if changed {
                    log::info!("agent is {state} on the server ({comment}); not taking jobs until that changes");
                }
                // As upstream, a restart asked for meanwhile (SIGUSR1) waits:
                // its `offline` post would undo the operator's state.
                if signals::restart_requested() && !self.restart_waits {
                    log::info!("restart requested (SIGUSR1); waiting until the agent is no longer {state}");
                    self.restart_waits = true;
                }
                return None;
            }
            _ if signals::restart_requested() => {
                log::info!("restart requested (SIGUSR1); exiting while idle");
                self.post_restarting("restart signal received from the supervisor");
                return Some(Exit::Restart);
            }
            _ if self.recovery_failed => {
                log::info!("operator changed the state to {:?}; taking jobs again", state.as_str());
                self.recovery_failed = false;
            }
            _ if changed => log::info!("agent state on the server: {:?}; taking jobs", state.as_str()),
            _ => {}
        }
        if !self.disk_has_room() {
            return None;
        }
        if let Some(queues) = self.config.advertised_queues() {
            if let Err(e) = self.client.post_queues(queues).filter_stop() {
                log::warn!("cannot post advertised queues: {e}");
            }
        }
        let job = match self.client.get_job(&self.queues(agent_data.as_ref())) {
            Ok(Some(job)) => job,
            Ok(None) => {
                notify::status("waiting for a job");
                return None;
            }
            Err(e) if e.is_stop() => return Some(Exit::Stopped),
            Err(e) => {
                log::error!("cannot get a job: {e}");
                return None;
            }
        };
        let summary = JobRunner::new(self.config, &mut self.client, job).with_metrics(&mut self.metrics).run();
        log::info!("job {} ended: {}; {}", summary.job_id, summary.end_reason, human::exit_statuses(&summary.statuses));
        if !summary.delivered {
            // Kept: tried again after a random part of the kept wait.
            self.kept.failed(Instant::now());
        }
        let mut after = Json::object().with("job_id", Json::str(""));
        let mut posts_waiting = false;
        if summary.recovery_failed {
            self.recovery_failed = true;
            // Upstream's words exactly: operators search for them.
            let comment =
                format!("Set to offline by agent. Recovery failed during job '{}' execution.", summary.job_id);
            AgentState::Offline.set_in(&mut after, &comment);
        } else {
            match self.client.held_state() {
                // Set by an operator while the job ran: keep it.
                Ok(Some((held, _))) => log::info!("agent is {held} on the server; not posting waiting"),
                Ok(None) => {
                    AgentState::Waiting.set_in(&mut after, "");
                    posts_waiting = true;
                }
                Err(e) => self.owe_waiting(&e),
            }
        }
        match self.post_data(&after) {
            Ok(()) => {}
            // The offline state must not be lost, or jobs would keep coming
            // to a device that cannot be recovered.
            Err(e) if summary.recovery_failed => {
                log::warn!("cannot post the offline state, retrying next cycle: {e}");
                self.offline_unposted = Some(after);
            }
            Err(e) if e.is_stop() => {}
            Err(e) => {
                log::warn!("cannot post agent state: {e}");
                // Owed like a waiting held back by a failed read: otherwise
                // the server shows the job's last phase until the next
                // heartbeat (an outage's hold fails it at once).
                self.waiting_unposted |= posts_waiting;
            }
        }
        summary.interrupted.then_some(Exit::Stopped)
    }
}

/// A call abandoned for the agent's stop is no failure to report.
trait FilterStop {
    fn filter_stop(self) -> Result<(), ClientError>;
}

impl FilterStop for Result<(), ClientError> {
    fn filter_stop(self) -> Result<(), ClientError> {
        match self {
            Err(e) if e.is_stop() => Ok(()),
            other => other,
        }
    }
}

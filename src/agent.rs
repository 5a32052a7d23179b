//! The polling loop: wait for the server, honour the state operators set
//! on it, deliver what earlier jobs left behind, take a job, run it.

use std::fs;
use std::time::Duration;

use crate::client::{Client, is_safe_id};
use crate::config::Config;
use crate::delivery;
use crate::job::JobRunner;
use crate::json::Json;
use crate::signals;

/// Why the loop ended; `main` maps it to an exit status.
#[derive(Debug, PartialEq)]
pub enum Exit {
    /// SIGTERM/SIGINT: the current job was wound down first.
    Stopped,
    /// `--once`: one polling cycle is done (a job was run, or none offered).
    Once,
    /// The server (state `restart`) or SIGUSR1 asked for a restart.
    Restart,
}

/// Longest wait between two attempts to reach the server.
const MAX_BACKOFF: Duration = Duration::from_secs(180);

pub struct Agent<'a> {
    config: &'a Config,
    client: Client,
    once: bool,
    /// Set after a phase exited 46: no job is taken until an operator
    /// changes the agent's state on the server.
    recovery_failed: bool,
}

impl<'a> Agent<'a> {
    pub fn new(config: &'a Config, client: Client, once: bool) -> Agent<'a> {
        Agent { config, client, once, recovery_failed: false }
    }

    fn interval(&self) -> Duration {
        Duration::from_secs_f64(self.config.polling_interval)
    }

    fn wait_for_server(&mut self) {
        let mut backoff = self.interval().clamp(Duration::from_millis(100), Duration::from_secs(5));
        while !signals::interrupted() && !self.client.is_reachable() {
            log::warn!("server {} not reachable, retrying in {backoff:?}", self.client.base_url());
            signals::sleep(backoff);
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    fn announce(&mut self) {
        let c = self.config;
        let mut data = Json::object()
            .with("job_id", Json::str(""))
            .with("queues", Json::Array(c.job_queues.iter().map(|q| Json::str(q.as_str())).collect()));
        for (key, value) in [("location", &c.location), ("provision_type", &c.provision_type), ("identifier", &c.identifier)] {
            if let Some(v) = value {
                data.set(key, Json::str(v.as_str()));
            }
        }
        // Unlike upstream, a restart does not overwrite a state an operator
        // set on the server: an agent in maintenance stays in maintenance.
        let current = self.client.get_agent_data().ok().flatten();
        let held = current.as_ref().and_then(|d| d.get("state")).and_then(Json::as_str).filter(|s| matches!(*s, "offline" | "maintenance"));
        match held {
            Some(state) => log::info!("the server has this agent {state}; keeping that state"),
            None => data.set("state", Json::str("waiting")),
        }
        if let Err(e) = self.client.post_agent_data(&data) {
            log::error!("cannot post agent data: {e}");
        }
        if let Some(images) = c.advertised_images_json() {
            if let Err(e) = self.client.post_images(&images) {
                log::error!("cannot post advertised images: {e}");
            }
        }
    }

    /// Run dirs left in `execution_basedir` by an agent that was killed:
    /// keep them for delivery so that their outcome is not forgotten.
    fn recover_interrupted_jobs(&mut self) {
        let Ok(dir) = fs::read_dir(&self.config.execution_basedir) else { return };
        for entry in dir.flatten() {
            let Some(job_id) = entry.file_name().to_str().map(String::from) else { continue };
            let path = entry.path();
            if !is_safe_id(&job_id) || !path.join("testflinger.json").exists() {
                continue;
            }
            log::warn!("job {job_id}: found an interrupted run dir; delivering what it recorded");
            delivery::keep(&self.config.results_basedir, &path, &job_id);
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
            .filter(|(q, owners)| !owners.is_empty_like() && self.config.job_queues.contains(q))
            .map(|(q, _)| q.clone())
            .collect();
        if restricted.is_empty() { self.config.job_queues.clone() } else { restricted }
    }

    pub fn run(&mut self) -> Exit {
        self.wait_for_server();
        self.announce();
        self.recover_interrupted_jobs();
        loop {
            if signals::interrupted() {
                return Exit::Stopped;
            }
            if signals::restart_requested() {
                log::info!("restart requested (SIGUSR1); exiting while idle");
                return Exit::Restart;
            }
            if let Some(exit) = self.cycle() {
                return exit;
            }
            if self.once {
                return Exit::Once;
            }
            signals::sleep(self.interval());
        }
    }

    /// One polling cycle; `Some` ends the loop.
    fn cycle(&mut self) -> Option<Exit> {
        if !delivery::deliver_kept(&mut self.client, &self.config.results_basedir) {
            log::warn!("earlier outcomes are still undelivered; not taking a job");
            return None;
        }
        let agent_data = match self.client.get_agent_data() {
            Ok(d) => d,
            Err(e) => {
                log::error!("cannot read agent data: {e}");
                if !self.client.is_reachable() {
                    self.wait_for_server();
                }
                return None;
            }
        };
        let state = agent_data.as_ref().and_then(|d| d.get("state")).and_then(Json::as_str).unwrap_or("").to_string();
        let comment = agent_data.as_ref().and_then(|d| d.get("comment")).and_then(Json::as_str).unwrap_or("").to_string();
        match state.as_str() {
            "restart" => {
                log::info!("the server asks for a restart; exiting while idle");
                let _ = self.client.post_agent_data(&Json::object().with("state", Json::str("offline")).with("comment", Json::str("restarting")));
                return Some(Exit::Restart);
            }
            "offline" | "maintenance" => {
                log::info!("agent is {state} on the server ({comment}); not taking jobs");
                return None;
            }
            _ if self.recovery_failed => {
                log::info!("operator changed the state to {state:?}; taking jobs again");
                self.recovery_failed = false;
            }
            _ => {}
        }
        if let Some(queues) = self.config.advertised_queues_json() {
            if let Err(e) = self.client.post_queues(&queues) {
                log::warn!("cannot post advertised queues: {e}");
            }
        }
        let job = match self.client.get_job(&self.queues(agent_data.as_ref())) {
            Ok(Some(job)) => job,
            Ok(None) => return None,
            Err(e) => {
                log::error!("cannot get a job: {e}");
                return None;
            }
        };
        let summary = JobRunner::new(self.config, Some(&mut self.client), job, false).run();
        log::info!("job {} ended: {} {:?}", summary.job_id, summary.end_reason, summary.statuses);
        let mut after = Json::object().with("job_id", Json::str(""));
        if summary.recovery_failed {
            self.recovery_failed = true;
            after.set("state", Json::str("offline"));
            after.set("comment", Json::str(format!("Device recovery failed in job {}", summary.job_id)));
        } else {
            after.set("state", Json::str("waiting"));
        }
        if let Err(e) = self.client.post_agent_data(&after) {
            log::warn!("cannot post agent state: {e}");
        }
        summary.interrupted.then_some(Exit::Stopped)
    }
}

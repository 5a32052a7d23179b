//! testflinger-agent: arguments, logging, one-line errors, exit codes.

#![warn(clippy::cast_possible_truncation)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use testflinger_agent::config::{self, Config};
use testflinger_agent::json::Json;
use testflinger_agent::{agent, client, job, lockfile, logging, metrics, notify, retry, runner, safe_fs, signals};

/// Exit status for usage and config errors.
const EXIT_USAGE: u8 = 2;
/// Exit status when another agent holds `execution_basedir` (EX_CANTCREAT);
/// not in RestartPreventExitStatus: the supervisor tries again later, and
/// the new agent starts once the other one is gone.
const EXIT_LOCKED: u8 = 73;
/// Exit status asking the supervisor for a restart (EX_TEMPFAIL).
const EXIT_RESTART: u8 = 75;
/// Exit status of `--once` when the server stayed unreachable (EX_UNAVAILABLE).
const EXIT_UNREACHABLE: u8 = 69;
/// The token file upstream's agent reads when none is given.
const DEFAULT_TOKEN_FILE: &str = "/var/lib/testflinger-agent/refresh_token";

/// The command line, parsed once.
struct Args {
    config: PathBuf,
    metrics_port: Option<u16>,
    token_file: Option<PathBuf>,
    once: bool,
    job: Option<PathBuf>,
}

enum Parsed {
    Run(Args),
    Exit(u8),
}

fn options() -> getopts::Options {
    let mut o = getopts::Options::new();
    o.optopt("c", "config", "config file (default testflinger-agent.conf)", "FILE");
    o.optopt("p", "metrics_port", "serve Prometheus metrics on this port", "PORT");
    o.optopt("", "token-file", "JSON file with the refresh token", "PATH");
    o.optflag("", "once", "take at most one job, finish it, and exit");
    o.optopt("", "job", "run one job from a local JSON or YAML file, no server", "FILE");
    o.optflag("h", "help", "print this help");
    o.optflag("V", "version", "print the version");
    o
}

fn parse_args(argv: &[String]) -> Parsed {
    let opts = options();
    let brief = "Usage: testflinger-agent [-c FILE] [-p PORT] [--token-file PATH] [--once] [--job FILE]";
    let m = match opts.parse(argv) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("testflinger-agent: {e}\n{}", opts.usage(brief));
            return Parsed::Exit(EXIT_USAGE);
        }
    };
    if m.opt_present("h") {
        print!("{}", opts.usage(brief));
        return Parsed::Exit(0);
    }
    if m.opt_present("V") {
        // One "key: value" a line after the first, for scripts and bug reports.
        println!(
            "testflinger-agent {}\ncommit: {}\ntarget: {}\nfeatures: {}\nbuilt: {}",
            env!("CARGO_PKG_VERSION"),
            env!("TF_AGENT_BUILD_COMMIT"),
            env!("TF_AGENT_BUILD_TARGET"),
            env!("TF_AGENT_BUILD_FEATURES"),
            env!("TF_AGENT_BUILD_DATE"),
        );
        return Parsed::Exit(0);
    }
    if !m.free.is_empty() {
        eprintln!("testflinger-agent: unexpected argument {:?}\n{}", m.free[0], opts.usage(brief));
        return Parsed::Exit(EXIT_USAGE);
    }
    let metrics_port = match m.opt_str("p").map(|p| p.parse::<u16>()) {
        None => None,
        Some(Ok(p)) => Some(p),
        Some(Err(_)) => {
            eprintln!("testflinger-agent: --metrics_port needs a port number\n{}", opts.usage(brief));
            return Parsed::Exit(EXIT_USAGE);
        }
    };
    Parsed::Run(Args {
        config: m.opt_str("c").unwrap_or_else(|| "testflinger-agent.conf".into()).into(),
        metrics_port,
        token_file: m.opt_str("token-file").map(PathBuf::from),
        once: m.opt_present("once"),
        job: m.opt_str("job").map(PathBuf::from),
    })
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse_args(&argv) {
        Parsed::Run(a) => a,
        Parsed::Exit(code) => return ExitCode::from(code),
    };
    // Descriptors the agent inherited (a pipe from a wrapper, whatever its
    // supervisor left open) must not reach the phase commands.
    runner::cloexec_inherited_fds();
    let mut config = match Config::load(&args.config).and_then(|c| c.prepare_dirs(&args.config).map(|()| c)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("testflinger-agent: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    config.export_token_file(args.token_file.as_deref().unwrap_or(Path::new(DEFAULT_TOKEN_FILE)));
    logging::init(config.logging_level(), Some(config.logging_basedir()), config.logging_quiet());
    signals::install();
    notify::init();
    // Held until exit: one agent per run dir. A dir that cannot be made or
    // locked is not fatal here: each job then reports it (status 100).
    let _lock = match lockfile::acquire(config.execution_basedir()) {
        Ok(lock) => Some(lock),
        Err(e @ lockfile::LockError::Busy { .. }) => {
            eprintln!("testflinger-agent: {e}");
            return ExitCode::from(EXIT_LOCKED);
        }
        Err(e) => {
            log::warn!("{e}; running without the one-agent-per-dir guard");
            None
        }
    };
    // Seen under qemu-user 7.2 (EINVAL): without it, a daemon a phase starts
    // with setsid escapes the kill at the phase's end. Worth one line.
    if let Err(e) = runner::become_subreaper() {
        log::warn!(
            "cannot become a child subreaper ({e}): processes a phase detaches with setsid may outlive the phase"
        );
    }
    if let (Some(path), Some(_)) = (&args.token_file, &args.job) {
        if let Some(w) = safe_fs::exposed_secret_warning(path) {
            log::warn!("{w}");
        }
    }

    match &args.job {
        Some(path) => run_local_job(&config, path),
        None => {
            let mut metrics = metrics::Metrics::new(config.agent_id(), config.identifier().unwrap_or(""));
            if let Some(port) = args.metrics_port {
                let address = std::net::SocketAddr::new(config.metrics_ip(), port);
                metrics = match metrics.serve(address) {
                    Ok(m) => m,
                    Err(e) => {
                        eprintln!(
                            "testflinger-agent: cannot serve metrics on {address}: {}",
                            testflinger_agent::human::without_os_error(&e.to_string())
                        );
                        return ExitCode::FAILURE;
                    }
                };
            }
            let metrics = metrics
                .with_vitals(config.execution_basedir().to_path_buf())
                .with_textfile(config.metrics_textfile().map(Path::to_path_buf));
            // Like upstream, upstream's default token file when none is given.
            let (token_file, origin) = match &args.token_file {
                Some(path) => (path.clone(), "--token-file"),
                None => (PathBuf::from(DEFAULT_TOKEN_FILE), "the default"),
            };
            let retry = retry::Retry::patient(config.server_timeout());
            let mut client = client::Client::new(config.server_address(), config.agent_id(), Some(token_file.clone()))
                .with_retry(retry);
            client.set_ca_file(config.server_ca_file().map(Path::to_path_buf));
            log::info!(
                "testflinger-agent {} for {} polling {}",
                env!("CARGO_PKG_VERSION"),
                config.agent_id(),
                client.base_url()
            );
            if let Some(path) = client::wire::server_path(config.server_address()) {
                log::warn!(
                    "server_address holds a path ({path}) that is not used: requests go to {}/v1/..., as upstream's agent sends them",
                    client.base_url()
                );
            }
            client.log_token_file(origin, args.token_file.is_some());
            if let Some(w) = safe_fs::exposed_secret_warning(&token_file) {
                log::warn!("{w}");
            }
            // Start-up checks are done (config, logging, run dir lock, metrics
            // port); reaching the server is the agent's work, not start-up.
            notify::ready("starting: contacting the server");
            let exit = agent::Agent::new(&config, client, args.once, metrics).run();
            // A stop signal that arrived after the last wake-up has not been
            // told to systemd yet: STOPPING=1 before the exit, not never.
            notify::tick();
            match exit {
                agent::Exit::Restart => ExitCode::from(EXIT_RESTART),
                agent::Exit::Unreachable => ExitCode::from(EXIT_UNREACHABLE),
                agent::Exit::Stopped | agent::Exit::Once => ExitCode::SUCCESS,
            }
        }
    }
}

/// `--job FILE`: the phases of one local job, no server; for trying a
/// device connector on the bench.
fn run_local_job(config: &Config, path: &Path) -> ExitCode {
    let job = match read_job_file(path) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("testflinger-agent: job file {}: {e}", path.display());
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let plan = job::plan::JobPlan::new(config, job.clone());
    let summary = job::JobRunner::new(config, &mut testflinger_agent::server::Local, job).run();
    println!("\n== job {} ({}) ==", summary.job_id, summary.end_reason);
    for line in summary_lines(&summary, &plan) {
        println!("{line}");
    }
    // Said again here: the job's first lines have scrolled away by now.
    for warning in &plan.warnings {
        println!("warning: {warning}");
    }
    if summary.statuses.is_empty() {
        println!("(no phase ran: check the *_command keys and the job's *_data)");
    }
    println!("run dir: {}", config.execution_basedir().join(&summary.job_id).display());
    if summary.failed() { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

/// The `--job` summary: each phase's exit code, or why it was skipped,
/// or that the job ended before it.
fn summary_lines(summary: &job::Summary, plan: &job::plan::JobPlan) -> Vec<String> {
    plan.phases
        .iter()
        .map(|planned| {
            let phase = planned.phase;
            let codes: Vec<String> =
                summary.statuses.iter().filter(|(p, _)| *p == phase).map(|(_, c)| c.to_string()).collect();
            let what = match &planned.skip {
                _ if !codes.is_empty() => codes.join(", "),
                Some(why) => format!("skipped: {why}"),
                None => "not run: the job ended before it".to_string(),
            };
            format!("{phase:<16} {what}")
        })
        .collect()
}

fn read_job_file(path: &Path) -> Result<Json, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let mut job = match Json::parse(&text) {
        Ok(j) => j,
        Err(json_err) => {
            let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).map_err(|e| {
                // Said as the one the file looks like it was meant to be.
                if text.trim_start().starts_with(['{', '[']) {
                    format!("not valid JSON: {json_err}")
                } else {
                    format!("not valid YAML: {e}")
                }
            })?;
            config::yaml_to_json(&yaml)
        }
    };
    if !matches!(job, Json::Object(_)) {
        return Err("a job must be a mapping".into());
    }
    match job.get("job_id").and_then(Json::as_str) {
        Some(id) if client::is_safe_id(id) => {}
        Some(id) => return Err(format!("job_id {id:?} is not a safe directory name")),
        None => job.set("job_id", Json::str(format!("local-{}", std::process::id()))),
    }
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn upstream_flags_parse() {
        let Parsed::Run(a) = parse_args(&args(&["-c", "x.conf", "-p", "8000", "--token-file", "/t", "--once"])) else {
            panic!("refused")
        };
        assert_eq!(a.config, PathBuf::from("x.conf"));
        assert_eq!(a.metrics_port, Some(8000));
        assert_eq!(a.token_file, Some(PathBuf::from("/t")));
        assert!(a.once);
        let Parsed::Run(a) = parse_args(&args(&["--metrics_port=9100"])) else { panic!() };
        assert_eq!(a.metrics_port, Some(9100));
    }

    #[test]
    fn wrong_usage_exits_2() {
        for bad in [&["--bogus"][..], &["-p", "x"], &["stray"]] {
            assert!(matches!(parse_args(&args(bad)), Parsed::Exit(2)), "{bad:?}");
        }
    }
}

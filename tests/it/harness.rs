//! Runs the real agent binary against a `FakeServer`.
//!
//! `Agent::new(&server)` gives an `AgentSetup`: a private temp dir and a
//! config with test defaults (fast polling, dirs inside the temp dir, DEBUG
//! logs, queue `test-queue`, no commands). Override keys with `.set()` (raw
//! YAML) or `.command()` (a shell snippet), then `.spawn()` or `.run_once()`.
//!
//! The binary is `CARGO_BIN_EXE_testflinger-agent`, or `$TF_AGENT_BIN`; when
//! `$TF_AGENT_WRAPPER` is set (e.g. `qemu-aarch64-static`) it is run as
//! `<wrapper> <binary> args...`, to check cross-compiled binaries.
#![allow(dead_code)]

use crate::fake_server::FakeServer;
use crate::json::{Json, quote};
use std::collections::hash_map::RandomState;
use std::fs::{self, File};
use std::hash::{BuildHasher, Hasher};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const AGENT_ID: &str = "test-agent-1";
pub const QUEUE: &str = "test-queue";

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A directory under the system temp dir, removed (recursively) on drop.
/// Set `TF_KEEP_TMP=1` to keep it for inspection.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{n}-{nanos}", std::process::id()));
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("TF_KEEP_TMP").is_none() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// A random UUID-shaped id (version 4 layout).
pub fn unique_id() -> String {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::SeqCst));
    let a = h.finish();
    h.write_u64(a);
    let b = h.finish();
    let hex = format!("{a:016x}{b:016x}");
    format!("{}-{}-4{}-8{}-{}", &hex[0..8], &hex[8..12], &hex[13..16], &hex[17..20], &hex[20..32])
}

/// A job as JSON text: `job_id`, `job_queue`, then the members of
/// `extra_fields` (a JSON object's text; `""` for none).
pub fn job_json(job_id: &str, queue: &str, extra_fields: &str) -> String {
    let mut job = Json::obj();
    job.set("job_id", Json::str(job_id));
    job.set("job_queue", Json::str(queue));
    if !extra_fields.trim().is_empty() {
        let extra = Json::parse(extra_fields).unwrap_or_else(|e| panic!("job_json extra fields: {e}"));
        for (k, v) in extra.as_object().expect("job_json: extra fields must be an object") {
            job.set(k, v.clone());
        }
    }
    job.to_string()
}

/// A YAML double-quoted scalar holding exactly `s`.
pub fn yaml_str(s: &str) -> String {
    // JSON string syntax is valid YAML double-quoted syntax.
    quote(s)
}

/// The agent binary under test: `$TF_AGENT_BIN` or the one cargo built.
pub fn agent_bin() -> String {
    std::env::var("TF_AGENT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_testflinger-agent").to_string())
}

/// A `Command` that runs the agent binary under test, through
/// `$TF_AGENT_WRAPPER` when set (words split on whitespace, e.g.
/// `qemu-aarch64-static -L /sysroot`). Every test that starts the agent goes
/// through here, so a cross-built binary is never exec'd directly.
pub fn agent_command() -> Command {
    let bin = agent_bin();
    match agent_wrapper() {
        Some(w) => {
            let mut words = w.split_whitespace();
            let mut c = Command::new(words.next().unwrap_or_default());
            c.args(words).arg(&bin);
            c
        }
        None => Command::new(&bin),
    }
}

/// `$TF_AGENT_WRAPPER` when set and not blank. Under a wrapper the agent's
/// pid is the wrapper's (qemu-user): figures read from `/proc/<pid>` (RSS)
/// are the emulator's, and tests must not hold the agent to them.
pub fn agent_wrapper() -> Option<String> {
    std::env::var("TF_AGENT_WRAPPER").ok().filter(|w| !w.trim().is_empty())
}

/// Entry point: `Agent::new(&server)`.
pub struct Agent;

impl Agent {
    #[allow(clippy::new_ret_no_self)]
    pub fn new(server: &FakeServer) -> AgentSetup {
        AgentSetup::new(server)
    }
}

/// The agent's config, temp dir, token file and extra arguments.
pub struct AgentSetup {
    dir: Arc<TempDir>,
    /// (key, raw YAML value text), written in this order.
    config: Vec<(String, String)>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    spawns: AtomicU64,
    /// Descriptors the agent inherits besides 0, 1 and 2 (see `leak_fds`).
    leak_fds: bool,
    /// A command the agent is started through (see `run_under`).
    prefix: Vec<String>,
}

impl AgentSetup {
    fn new(server: &FakeServer) -> AgentSetup {
        let dir = Arc::new(TempDir::new("tf-agent-it"));
        let p = |sub: &str| yaml_str(&dir.path().join(sub).to_string_lossy());
        let config = vec![
            ("agent_id".to_string(), AGENT_ID.to_string()),
            ("identifier".to_string(), "test-identifier".to_string()),
            ("location".to_string(), "test-lab".to_string()),
            ("polling_interval".to_string(), "0.1".to_string()),
            ("server_address".to_string(), yaml_str(&server.url())),
            ("execution_basedir".to_string(), p("run")),
            ("logging_basedir".to_string(), p("logs")),
            ("results_basedir".to_string(), p("results")),
            ("logging_level".to_string(), "DEBUG".to_string()),
            ("job_queues".to_string(), format!("[{QUEUE}]")),
        ];
        AgentSetup {
            dir,
            config,
            args: Vec::new(),
            env: Vec::new(),
            spawns: AtomicU64::new(0),
            leak_fds: false,
            prefix: Vec::new(),
        }
    }

    /// Sets or replaces `key` with raw YAML text (`"0.5"`, `"[a, b]"`,
    /// `"\"quoted\""`). A multi-line value is written as an indented block
    /// under the key, e.g. `"q1: first\nq2: second"` for a map.
    pub fn set(mut self, key: &str, yaml_value: &str) -> Self {
        match self.config.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = yaml_value.to_string(),
            None => self.config.push((key.to_string(), yaml_value.to_string())),
        }
        self
    }

    /// Sets `<phase>_command` to a shell snippet (quoted for YAML here).
    pub fn command(self, phase: &str, shell: &str) -> Self {
        self.set(&format!("{phase}_command"), &yaml_str(shell))
    }

    pub fn remove(mut self, key: &str) -> Self {
        self.config.retain(|(k, _)| k != key);
        self
    }

    /// Writes `{"refresh_token": "..."}` to a file and passes `--token-file`.
    pub fn token(self, refresh_token: &str) -> Self {
        let path = self.dir.path().join("refresh_token");
        let mut v = Json::obj();
        v.set("refresh_token", Json::str(refresh_token));
        fs::write(&path, v.to_string()).expect("write token file");
        // Private, as docs/operations.md tells operators; tests of the warning widen it.
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod token file");
        let path = path.to_string_lossy().into_owned();
        self.arg("--token-file").arg(&path)
    }

    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.to_string());
        self
    }

    pub fn args(mut self, a: &[&str]) -> Self {
        self.args.extend(a.iter().map(|s| s.to_string()));
        self
    }

    /// An environment variable for the agent process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Starts the agent with descriptors it did not open itself, as a
    /// careless supervisor would leave them: `/dev/null` on fd 10 and both
    /// ends of a pipe (at their own numbers and dup'ed to 11 and 12), none
    /// close-on-exec.
    pub fn leak_fds(mut self) -> Self {
        self.leak_fds = true;
        self
    }

    /// Starts the agent as `<prefix...> <agent command>` (e.g. `nsenter`
    /// into a namespace); the pid is the agent's when the prefix execs.
    pub fn run_under(mut self, prefix: &[String]) -> Self {
        self.prefix = prefix.to_vec();
        self
    }

    /// The raw YAML text of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.config.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A config path key's value as a path (quotes stripped).
    fn path_key(&self, key: &str, default_sub: &str) -> PathBuf {
        match self.get(key) {
            Some(v) => PathBuf::from(
                Json::parse(v)
                    .ok()
                    .and_then(|j| j.as_str().map(str::to_string))
                    .unwrap_or_else(|| v.trim().to_string()),
            ),
            None => self.dir.path().join(default_sub),
        }
    }

    pub fn execution_dir(&self) -> PathBuf {
        self.path_key("execution_basedir", "run")
    }

    pub fn logging_dir(&self) -> PathBuf {
        self.path_key("logging_basedir", "logs")
    }

    pub fn results_dir(&self) -> PathBuf {
        self.path_key("results_basedir", "results")
    }

    /// `<execution_basedir>/<job_id>`
    pub fn run_dir(&self, job_id: &str) -> PathBuf {
        self.execution_dir().join(job_id)
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("testflinger-agent.conf")
    }

    /// The config file text as it will be written.
    pub fn config_text(&self) -> String {
        let mut out = String::new();
        for (k, v) in &self.config {
            if v.contains('\n') {
                out.push_str(&format!("{k}:\n"));
                for line in v.lines() {
                    out.push_str(&format!("  {line}\n"));
                }
            } else {
                out.push_str(&format!("{k}: {v}\n"));
            }
        }
        out
    }

    pub fn write_config(&self) -> PathBuf {
        let path = self.config_path();
        fs::write(&path, self.config_text()).expect("write agent config");
        path
    }

    /// Writes the config and starts the agent with `-c <config>` plus the
    /// extra args (and `extra`). May be called again (e.g. after a restart);
    /// each run has its own stdout/stderr files.
    pub fn spawn_with(&self, extra: &[&str]) -> AgentProc {
        let config = self.write_config();
        let n = self.spawns.fetch_add(1, Ordering::SeqCst);
        let stdout_path = self.dir.path().join(format!("stdout-{n}.txt"));
        let stderr_path = self.dir.path().join(format!("stderr-{n}.txt"));
        let bin = agent_bin();
        let mut cmd = match self.prefix.split_first() {
            Some((first, rest)) => {
                let inner = agent_command();
                let mut c = Command::new(first);
                c.args(rest).arg(inner.get_program()).args(inner.get_args());
                c
            }
            None => agent_command(),
        };
        cmd.arg("-c").arg(&config).args(&self.args).args(extra);
        cmd.current_dir(self.dir.path());
        cmd.env("RUST_BACKTRACE", "1");
        // The loopback server must not be reached through a proxy or judged
        // by a CA file from the machine's environment; tests that want one
        // set it with `.env()`.
        for k in [
            "http_proxy",
            "https_proxy",
            "all_proxy",
            "no_proxy",
            "SSL_CERT_FILE",
            "SSL_CERT_DIR",
            "REQUESTS_CA_BUNDLE",
            "CURL_CA_BUNDLE",
        ] {
            cmd.env_remove(k).env_remove(k.to_ascii_uppercase());
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null());
        cmd.stdout(File::create(&stdout_path).expect("create stdout file"));
        cmd.stderr(File::create(&stderr_path).expect("create stderr file"));
        // Own process group, so dropping the AgentProc also ends the
        // commands it started (unless they moved to their own group).
        cmd.process_group(0);
        if self.leak_fds {
            // SAFETY: only raw system calls between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    let mut p = [0; 2];
                    if libc::pipe(p.as_mut_ptr()) != 0
                        || libc::dup2(0, 10) < 0
                        || libc::dup2(p[0], 11) < 0
                        || libc::dup2(p[1], 12) < 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn agent {bin}: {e}"));
        AgentProc {
            child,
            status: None,
            stdout_path,
            stderr_path,
            log_path: self.logging_dir().join("testflinger-agent.log"),
            _dir: self.dir.clone(),
        }
    }

    pub fn spawn(&self) -> AgentProc {
        self.spawn_with(&[])
    }

    /// Runs with `--once` and waits; on timeout kills it and panics with
    /// its stderr and log.
    pub fn run_once(&self, timeout: Duration) -> Output {
        let mut p = self.spawn_with(&["--once"]);
        match p.wait_timeout(timeout) {
            Some(status) => Output { status, stdout: p.stdout_bytes(), stderr: p.stderr_bytes() },
            None => {
                p.kill();
                panic!("agent --once did not exit within {timeout:?}\n{}", p.diagnostics());
            }
        }
    }
}

/// A running agent. Killed (with its process group) when dropped.
pub struct AgentProc {
    child: Child,
    status: Option<ExitStatus>,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    log_path: PathBuf,
    _dir: Arc<TempDir>,
}

impl AgentProc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Polls for exit every 10 ms; `None` when still running after `d`.
    pub fn wait_timeout(&mut self, d: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + d;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Like `wait_timeout`, but panics with diagnostics on timeout.
    pub fn wait_exit(&mut self, d: Duration) -> ExitStatus {
        match self.wait_timeout(d) {
            Some(s) => s,
            None => panic!("agent did not exit within {d:?}\n{}", self.diagnostics()),
        }
    }

    /// Sends `sig` (e.g. `libc::SIGTERM`) to the agent process only.
    pub fn signal(&self, sig: i32) {
        if self.status.is_none() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, sig);
            }
        }
    }

    /// SIGKILLs the agent's process group and reaps the agent.
    pub fn kill(&mut self) {
        if self.try_wait().is_none() {
            // SAFETY: kill(2) on the process group we created for the child.
            unsafe {
                libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL);
            }
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    pub fn stdout_bytes(&self) -> Vec<u8> {
        fs::read(&self.stdout_path).unwrap_or_default()
    }

    pub fn stderr_bytes(&self) -> Vec<u8> {
        fs::read(&self.stderr_path).unwrap_or_default()
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout_bytes()).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr_bytes()).into_owned()
    }

    /// `<logging_basedir>/testflinger-agent.log`, or "" when absent.
    pub fn log_text(&self) -> String {
        fs::read(&self.log_path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// stdout, stderr and log file, for failure messages.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- agent stdout ---\n{}\n--- agent stderr ---\n{}\n--- agent log ({}) ---\n{}",
            self.stdout_text(),
            self.stderr_text(),
            self.log_path.display(),
            self.log_text()
        )
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
    }
}

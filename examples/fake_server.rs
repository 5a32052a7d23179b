//! The integration tests' fake Testflinger server as a stand-alone program,
//! for the full-system VM check (cross/vm-check.sh): built static for the
//! target, it runs inside the VM next to the agent on 127.0.0.1.
//!
//!   fake_server PORT_FILE CONTROL_FIFO
//!
//! Writes its `http://127.0.0.1:PORT` URL to PORT_FILE, then reads one
//! command per line from CONTROL_FIFO (reopened after each writer closes it)
//! so a shell script can drive it:
//!
//!   push FILE       queue the job in FILE (JSON with job_id and job_queue)
//!   cancel ID       mark the job cancelled
//!   dump ID DIR     write DIR/states (job states posted, one a line),
//!                   DIR/output (the live output), DIR/artifacts (member
//!                   paths, one a line), DIR/events (event names) and
//!                   last DIR/done
//!   requests FILE   write every request line seen so far to FILE
//!   quit            exit
#![allow(clippy::print_stdout, clippy::print_stderr)]

#[path = "../tests/it/fake_server.rs"]
mod fake_server;
#[path = "../tests/it/json.rs"]
mod json;

use fake_server::FakeServer;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(port_file), Some(fifo)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: fake_server PORT_FILE CONTROL_FIFO");
        return ExitCode::from(2);
    };
    let server = FakeServer::start();
    if let Err(e) = fs::write(port_file, server.url()) {
        eprintln!("fake_server: cannot write {port_file}: {e}");
        return ExitCode::FAILURE;
    }
    loop {
        let file = match fs::File::open(fifo) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("fake_server: cannot open {fifo}: {e}");
                return ExitCode::FAILURE;
            }
        };
        for line in BufReader::new(file).lines() {
            let Ok(line) = line else { break };
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["quit"] => return ExitCode::SUCCESS,
                cmd => {
                    if let Err(e) = run(&server, cmd) {
                        eprintln!("fake_server: {line}: {e}");
                    }
                }
            }
        }
    }
}

fn run(server: &FakeServer, cmd: &[&str]) -> Result<(), String> {
    let io = |e: std::io::Error| e.to_string();
    match cmd {
        ["push", file] => {
            let text = fs::read_to_string(file).map_err(io)?;
            json::Json::parse(&text)?;
            server.push_job(&text);
        }
        ["cancel", id] => server.cancel_job(id),
        ["dump", id, dir] => {
            let dir = Path::new(dir);
            fs::create_dir_all(dir).map_err(io)?;
            let lines = |v: Vec<String>| v.iter().map(|s| format!("{s}\n")).collect::<String>();
            fs::write(dir.join("states"), lines(server.job_states_posted(id))).map_err(io)?;
            fs::write(dir.join("output"), server.log_text(id, "output")).map_err(io)?;
            let members = server.artifact_members(id).into_iter().map(|(p, _, _)| p).collect();
            fs::write(dir.join("artifacts"), lines(members)).map_err(io)?;
            fs::write(dir.join("events"), lines(server.events(id))).map_err(io)?;
            fs::write(dir.join("done"), "").map_err(io)?;
        }
        ["requests", file] => fs::write(file, server.request_lines().join("\n") + "\n").map_err(io)?,
        _ => return Err("unknown command".to_string()),
    }
    Ok(())
}

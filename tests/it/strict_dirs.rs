//! Base dirs whose path another user could alter are refused at start, and
//! a run dir swapped for another user's mid-job is not used (issue 21,
//! item 4). The tests run as root: "another user" is uid 65534, given the
//! test's own directories with chown.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, chown};
use std::path::Path;
use std::time::Duration;

use crate::fake_server::FakeServer;
use crate::harness::{Agent, QUEUE, job_json, unique_id, yaml_str};
use crate::json::Json;

const T: Duration = Duration::from_secs(30);
const OTHER: u32 = 65534;

/// chown to another uid needs root: as another user these tests fail,
/// unless `TF_TESTS_UNPRIVILEGED` says skipping them is meant.
fn root(dir: &Path) -> bool {
    let probe = dir.join(".uid-probe");
    fs::write(&probe, "").unwrap();
    let uid = fs::metadata(&probe).unwrap().uid();
    if uid != 0 {
        crate::small_disk::skip_or_fail("not root: cannot give a directory to another user");
    }
    uid == 0
}

fn dir_with(parent: &Path, name: &str, mode: u32, owner: u32) -> std::path::PathBuf {
    let d = parent.join(name);
    fs::create_dir(&d).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(mode)).unwrap();
    chown(&d, Some(owner), None).unwrap();
    d
}

#[test]
fn a_base_dir_under_a_parent_another_user_can_alter_exits_2_naming_it() {
    let server = FakeServer::start();
    server.push_job(&job_json(&unique_id(), QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    let probe = Agent::new(&server);
    if !root(probe.dir()) {
        return;
    }
    for key in ["execution_basedir", "results_basedir", "logging_basedir"] {
        let setup = Agent::new(&server);
        let theirs = dir_with(setup.dir(), "theirs", 0o755, OTHER);
        let open = dir_with(setup.dir(), "shared", 0o777, 0);
        for (parent, fault) in [(&theirs, "owned by uid 65534 (mode 0755)"), (&open, "mode 0777 (owner uid 0)")] {
            let base = parent.join("tf").join("base");
            let out = Agent::new(&server).set(key, &yaml_str(&base.to_string_lossy())).run_once(T);
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            assert_eq!(out.status.code(), Some(2), "{key}: {err}");
            assert_eq!(err.trim().lines().count(), 1, "{key}: one line: {err}");
            let refusal = format!("refusing {}: {fault}", parent.display());
            assert!(err.contains(&format!("`{key}`")) && err.contains(&refusal), "{key}: {err}");
            assert!(!parent.join("tf").exists(), "nothing made under {}", parent.display());
        }
        // The same layout with a sticky parent, as /tmp is, starts: the
        // refusals above are the parents' doing, not the layout's.
        let sticky = dir_with(setup.dir(), "sticky", 0o1777, 0);
        let out = Agent::new(&server).set(key, &yaml_str(&sticky.join("tf/base").to_string_lossy())).run_once(T);
        assert!(out.status.success(), "{key}: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(server.queued_jobs(), 0, "the sticky runs took the job");
}

#[test]
fn a_metrics_textfile_in_another_users_directory_exits_2() {
    let server = FakeServer::start();
    let setup = Agent::new(&server);
    if !root(setup.dir()) {
        return;
    }
    let theirs = dir_with(setup.dir(), "textfile", 0o755, OTHER);
    let out = setup.set("metrics_textfile", &yaml_str(&theirs.join("tf.prom").to_string_lossy())).run_once(T);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("`metrics_textfile`")
            && err.contains(&format!("refusing {}: owned by uid 65534", theirs.display())),
        "{err}"
    );
    assert!(server.requests().is_empty());
}

/// Someone who could write `execution_basedir` (here the setup phase, as
/// root, standing in for them) swaps the run dir for one of their own with
/// their job file, serial log and a world-writable `test.log`: the test
/// phase does not run there, their files are neither read nor written,
/// no file of the agent's is made there, and their dir is not removed.
#[test]
fn a_run_dir_swapped_for_another_users_mid_job_is_not_used() {
    let server = FakeServer::start();
    let job = unique_id();
    server.push_job(&job_json(&job, QUEUE, r#"{"test_data":{"test_cmds":"x"}}"#));
    // Their dir is made whole (owned by them) aside, then swapped in with a
    // rename, as another user would: made in place as root and chowned
    // after, its files would be ours for an instant, and the serial tail
    // could rightly read them.
    let swap = format!(
        r#"d="$PWD"; t="$d.theirs"; mkdir "$t"; printf '{{"job_id":"{job}","test_data":{{"test_cmds":"FORGED"}}}}' > "$t/testflinger.json"; printf 'theirs\n' > "$t/test.log"; chmod 666 "$t/test.log"; printf 'THEIR-SERIAL\n' > "$t/test-serial.log"; chown -R {OTHER} "$t"; mv "$d" "$d.ours"; mv "$t" "$d"; stat -c %u "$d" > "$d.owner""#
    );
    let agent = Agent::new(&server).command("setup", &swap).command("test", "cat testflinger.json; echo phase-ran");
    if !root(agent.dir()) {
        return;
    }
    let theirs = agent.run_dir(&job);
    let out = agent.run_once(T);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(fs::read_to_string(theirs.with_extension("owner")).unwrap().trim(), "65534", "no swap");
    // Their dir is left as they made it: not written to, not removed.
    let mut names: Vec<String> =
        fs::read_dir(&theirs).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["test-serial.log", "test.log", "testflinger.json"]);
    assert_eq!(fs::read_to_string(theirs.join("test.log")).unwrap(), "theirs\n");
    let output = server.log_text(&job, "output");
    assert!(!output.contains("FORGED") && !output.contains("phase-ran"), "{output}");
    let serial = server.log_text(&job, "serial");
    assert!(!serial.contains("THEIR-SERIAL"), "their serial log was sent: {serial}");
    let log = fs::read_to_string(agent.logging_dir().join("testflinger-agent.log")).unwrap();
    let their_dir = format!(
        "refusing {}: owned by uid 65534 (mode 0755), neither root nor this agent's user (uid 0); it holds",
        theirs.display()
    );
    for file in ["test.log", "testflinger-outcome.json"] {
        let refusal = format!("{their_dir} {}", theirs.join(file).display());
        assert!(log.contains(&refusal), "{refusal}\n{log}");
    }
    let kept = format!("cannot remove {}: refusing {}: owned by uid 65534", theirs.display(), theirs.display());
    assert!(log.contains(&kept), "{kept}\n{log}");
    let result = server.result(&job).expect("outcome");
    assert_eq!(result.at("status.test").and_then(Json::as_i64), Some(100), "{result:?}");
}

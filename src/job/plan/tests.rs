use super::*;

const ALL_COMMANDS: &str = "setup_command: s\nprovision_command: p\nfirmware_update_command: f\n\
    test_command: t\nallocate_command: a\nreserve_command: r\ncleanup_command: c\n";

fn config(extra: &str) -> Config {
    let text = format!("agent_id: a\nserver_address: x\njob_queues: [q]\n{extra}");
    Config::parse(&text, std::path::Path::new("t.conf")).expect("test config")
}

fn plan(conf: &str, job: &str) -> JobPlan {
    JobPlan::new(&config(conf), Json::parse(job).expect("test job"))
}

#[test]
fn skip_rules() {
    use Phase::*;
    let none = None::<&str>;
    // (config, job, phase, why it is skipped)
    let table = [
        (ALL_COMMANDS, r#"{}"#, Setup, none),
        (ALL_COMMANDS, r#"{}"#, Cleanup, none),
        ("", r#"{}"#, Setup, Some("no setup_command configured")),
        ("", r#"{"test_data":{"x":1}}"#, Test, Some("no test_command configured")),
        ("cleanup_command: '  '\n", r#"{}"#, Cleanup, Some("no cleanup_command configured")),
        (ALL_COMMANDS, r#"{}"#, Provision, Some("no provision_data in the job")),
        (ALL_COMMANDS, r#"{"test_data":{}}"#, Test, Some("empty test_data in the job")),
        (ALL_COMMANDS, r#"{"test_data":null}"#, Test, Some("empty test_data in the job")),
        (ALL_COMMANDS, r#"{"test_data":""}"#, Test, Some("empty test_data in the job")),
        (ALL_COMMANDS, r#"{"test_data":"run"}"#, Test, Some("test_data is not a mapping")),
        (ALL_COMMANDS, r#"{"test_data":[1]}"#, Test, Some("test_data is not a mapping")),
        (ALL_COMMANDS, r#"{"reserve_data":{"skip":true}}"#, Reserve, Some("reserve_data has skip: true")),
        (ALL_COMMANDS, r#"{"reserve_data":{"skip":false}}"#, Reserve, none),
        (ALL_COMMANDS, r#"{"allocate_data":{"allocate":true}}"#, Allocate, none),
        // Attachments alone do not make a phase run; with more they do.
        (ALL_COMMANDS, r#"{"test_data":{"attachments":[{"agent":"a"}]}}"#, Test, Some("no test_data in the job")),
        (ALL_COMMANDS, r#"{"test_data":{"attachments":[],"test_cmds":"x"}}"#, Test, none),
        (ALL_COMMANDS, r#"{"provision_data":{"attachments":[1],"url":"u"}}"#, Provision, none),
        // Only the phases that take attachments lose them.
        (ALL_COMMANDS, r#"{"reserve_data":{"attachments":1}}"#, Reserve, none),
        // Secrets alone are no data either: they are taken out first.
        (ALL_COMMANDS, r#"{"test_data":{"secrets":{"K":"v"}}}"#, Test, Some("empty test_data in the job")),
    ];
    for (conf, job, phase, want) in table {
        let got = plan(conf, job);
        assert_eq!(got.phase(phase).skip.as_deref(), want, "{phase} in {job} with {conf:?}");
    }
}

#[test]
fn attachments_stay_in_the_document_for_the_connectors() {
    let p = plan(ALL_COMMANDS, r#"{"job_id":"j","attachments_status":"complete","test_data":{"attachments":[1]}}"#);
    assert!(p.attachments);
    assert_eq!(
        p.document.to_string_compact(),
        r#"{"job_id":"j","attachments_status":"complete","test_data":{"attachments":[1]}}"#
    );
    assert!(!plan(ALL_COMMANDS, r#"{"attachments_status":"waiting"}"#).attachments);
}

#[test]
fn timeouts() {
    use Phase::*;
    let s = |secs: u64| Some(Duration::from_secs(secs));
    // (config, job, phase, global, output)
    let table = [
        ("", r#"{}"#, Test, s(14400), s(900)),
        ("", r#"{}"#, Setup, s(14400), None),
        ("", r#"{"global_timeout":60,"output_timeout":30}"#, Test, s(60), s(30)),
        ("", r#"{"global_timeout":60,"output_timeout":30}"#, Provision, s(60), None),
        ("", r#"{"global_timeout":60}"#, Cleanup, s(60), None),
        (
            "global_timeout: 40\noutput_timeout: 20\n",
            r#"{"global_timeout":60,"output_timeout":10}"#,
            Test,
            s(40),
            s(10),
        ),
        ("global_timeout: 40\n", r#"{}"#, Test, s(40), s(900)),
        ("", r#"{"global_timeout":"soon","output_timeout":-3}"#, Test, s(14400), s(900)),
        ("output_timeout: 20\n", r#"{"output_timeout":0}"#, Test, s(14400), s(20)),
        // Capped as upstream caps them: by the config's value, or by the
        // default when the config has none.
        ("", r#"{"global_timeout":86400,"output_timeout":3600}"#, Test, s(14400), s(900)),
        (
            "global_timeout: 90000\noutput_timeout: 7200\n",
            r#"{"global_timeout":86400,"output_timeout":3600}"#,
            Test,
            s(86400),
            s(3600),
        ),
        // A config value above the default only lets jobs ask for more.
        ("global_timeout: 90000\n", r#"{}"#, Allocate, s(14400), None),
        ("global_timeout: 90000\n", r#"{"global_timeout":20000}"#, Allocate, s(20000), None),
        // Out of range: ignored, as a wrong type is.
        ("", r#"{"global_timeout":9223372036854775807,"output_timeout":1e300}"#, Test, s(14400), s(900)),
        ("global_timeout: 31536000\n", r#"{"global_timeout":31536001}"#, Test, s(14400), s(900)),
        ("global_timeout: 31536000\n", r#"{"global_timeout":18446744073709551616}"#, Test, s(14400), s(900)),
        ("global_timeout: 31536000\n", r#"{"global_timeout":31536000.0}"#, Test, s(31536000), s(900)),
        ("", r#"{"global_timeout":-9223372036854775808,"output_timeout":-1e300}"#, Test, s(14400), s(900)),
        // Reserve has no limit of the agent's: the connector waits out the reservation.
        ("global_timeout: 40\n", r#"{"global_timeout":60}"#, Reserve, None, None),
    ];
    for (conf, job, phase, global, output) in table {
        let limits = plan(conf, job).phase(phase).limits;
        assert_eq!((limits.global, limits.output), (global, output), "{phase} in {job} with {conf:?}");
        assert!(limits.kill_grace.is_some());
    }
}

#[test]
fn wrong_typed_fields_are_named_with_what_is_used() {
    let job = r#"{"job_id":"j","global_timeout":"soon","output_timeout":-3,"test_data":"a string","provision_data":{"url":"u"},"reserve_data":""}"#;
    assert_eq!(
        plan("output_timeout: 60\n", job).warnings,
        [
            r#"global_timeout: "soon" is not a positive number of seconds; using the default, 14400 s"#,
            "output_timeout: -3 is not a positive number of seconds; using the config's, 60 s",
            "test_data: a string, not a mapping; the test phase is skipped",
        ]
    );
    let huge = r#"{"global_timeout":9223372036854775807,"output_timeout":1e300}"#;
    assert_eq!(
        plan("global_timeout: 60\noutput_timeout: 7200\n", huge).warnings,
        [
            "global_timeout: 9223372036854775807 is more than the longest allowed, 31536000 s; using the config's, 60 s",
            "output_timeout: 1e300 is more than the longest allowed, 31536000 s; using the default, 900 s",
        ]
    );
    // Above the cap but in range: capped without a word, as upstream does.
    assert!(plan("", r#"{"global_timeout":86400}"#).warnings.is_empty());
    let fine = r#"{"job_id":"j","global_timeout":30,"output_timeout":30.0,"test_data":{}}"#;
    assert!(plan("", fine).warnings.is_empty());
    assert_eq!(
        plan("", r#"{"allocate_data":7}"#).warnings,
        ["allocate_data: a number, not a mapping; the allocate phase is skipped"]
    );
}

#[test]
fn secrets_go_to_their_own_phase_and_leave_the_document() {
    let p = plan(
        ALL_COMMANDS,
        r#"{"job_id":"j","provision_data":{"url":"u","secrets":{"TOKEN":"t1","N":7,"E":null}},"test_data":{"secrets":{"PW":"p"},"x":1},"cleanup_data":{"secrets":"not a mapping"}}"#,
    );
    let own = |phase| p.phase(phase).secrets.clone();
    let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
    assert_eq!(own(Phase::Provision), [pair("TOKEN", "t1"), pair("N", "7"), pair("E", "")]);
    assert_eq!(own(Phase::Test), [pair("PW", "p")]);
    assert!(own(Phase::Setup).is_empty() && own(Phase::Cleanup).is_empty());
    assert_eq!(p.secret_values().collect::<Vec<_>>(), ["t1", "7", "", "p"]);
    assert_eq!(
        p.document.to_string_compact(),
        r#"{"job_id":"j","provision_data":{"url":"u"},"test_data":{"x":1},"cleanup_data":{}}"#
    );
    assert_eq!(p.job_id, "j");
    assert_eq!(plan("", "{}").job_id, "local-job");
}

#[test]
fn unknown_job_keys_are_named_with_the_nearest_known_one() {
    let warned = |job: &str| plan(ALL_COMMANDS, job).warnings;
    assert_eq!(
        warned(r#"{"tset_data":{"test_cmds":"x"}}"#),
        ["unknown job key tset_data (did you mean test_data?): ignored"]
    );
    assert_eq!(
        warned(r#"{"job_queue":"q","global_timout":5}"#),
        ["unknown job key global_timout (did you mean global_timeout?): ignored"]
    );
    assert_eq!(warned(r#"{"colour":"red"}"#), ["unknown job key colour: ignored"]);
    assert_eq!(warned("{\"a\\nb\":1}"), ["unknown job key a\\nb: ignored"]);
    // Every key upstream's server sends, and every phase's data.
    let all = r#"{"job_id":"j","parent_job_id":"p","name":"n","tags":[],"job_queue":"q","global_timeout":9,
        "output_timeout":9,"allocation_timeout":9,"provision_data":{},"firmware_update_data":{},"test_data":{},
        "allocate_data":{},"reserve_data":{},"job_status_webhook":"w","job_priority":1,"exclude_agents":[],
        "debug":true,"attachments_status":"complete","client_id":"c","started_at":"t","setup_data":{},"cleanup_data":{}}"#;
    assert!(warned(all).is_empty(), "{:?}", warned(all));
    assert_eq!(edit_distance("tset", "test"), 1);
    assert_eq!(edit_distance("", "abc"), 3);
}

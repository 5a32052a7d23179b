use super::*;
use crate::json::Json;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("t.conf"))
}

const MINIMAL: &str = "agent_id: a1\nserver_address: 10.0.0.5:8000\njob_queues: [q]\n";

#[test]
fn defaults_match_upstream() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.schedules().poll, Duration::from_secs(10));
    assert_eq!(c.execution_basedir(), Path::new("/tmp/testflinger/run"));
    assert_eq!(c.logging_basedir(), Path::new("/tmp/testflinger/logs"));
    assert_eq!(c.results_basedir(), Path::new("/tmp/testflinger/results"));
    assert_eq!(c.logging_level(), LevelFilter::Info);
    assert!(!c.logging_quiet() && !c.mask_artifacts());
    assert_eq!(c.server_timeout(), Duration::from_secs(30));
    assert_eq!((c.global_timeout(), c.output_timeout()), (None, None));
    assert_eq!(c.min_free_mb(), 1024);
    assert_eq!(c.command(Phase::Test), "");
    assert!(c.phase_env().contains(&("agent_id".into(), "a1".into())));
    let raw: raw::RawConfig = serde_yaml_ng::from_str(MINIMAL).unwrap();
    assert_eq!(raw.output_bytes, 10 * 1024 * 1024);
}

#[test]
fn phase_env_is_what_upstream_exports() {
    let mut c = parse(&format!(
        "{MINIMAL}location: lab 2\ntest_command: run\nlogging_level: DEBUG\nlogging_quiet: true\nglobal_timeout: 60\n"
    ))
    .unwrap();
    c.export_token_file(Path::new("/t/token"));
    let get = |k: &str| c.phase_env().iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    // Written strings as written, over the defaults.
    assert_eq!(get("agent_id"), Some("a1"));
    assert_eq!(get("server_address"), Some("10.0.0.5:8000"));
    assert_eq!(get("location"), Some("lab 2"));
    assert_eq!(get("test_command"), Some("run"));
    assert_eq!(get("logging_level"), Some("DEBUG"));
    // String keys left out, at upstream's defaults; commands empty.
    assert_eq!(get("execution_basedir"), Some("/tmp/testflinger/run"));
    assert_eq!(get("logging_basedir"), Some("/tmp/testflinger/logs"));
    assert_eq!(get("results_basedir"), Some("/tmp/testflinger/results"));
    for phase in ["setup", "provision", "firmware_update", "allocate", "reserve", "cleanup"] {
        assert_eq!(get(&format!("{phase}_command")), Some(""), "{phase}");
    }
    assert_eq!(get("token_file"), Some("/t/token"));
    // Not strings in upstream's config: not exported.
    for key in [
        "job_queues",
        "polling_interval",
        "logging_quiet",
        "global_timeout",
        "output_bytes",
        "identifier",
        "provision_type",
        "server_timeout",
    ] {
        assert_eq!(get(key), None, "{key}");
    }
    // Each key once, the token file too when set again.
    c.export_token_file(Path::new("/u"));
    let mut keys: Vec<_> = c.phase_env().iter().map(|(k, _)| k.as_str()).collect();
    let n = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), n);
    assert_eq!(n, 15);
}

#[test]
fn errors_name_the_key() {
    let e = parse(&format!("{MINIMAL}test_comand: x\n")).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("test_comand"));
    assert_eq!(e.line, Some(4));
    let e = parse("agent_id: a1\njob_queues: [q]\n").unwrap_err();
    assert_eq!(e.key.as_deref(), Some("server_address"));
    let e = parse("agent_id: a1\nserver_address: s\njob_queues: q\n").unwrap_err();
    assert_eq!(e.key.as_deref(), Some("job_queues"), "{e}");
    let e = parse(&format!("{MINIMAL}polling_interval: soon\n")).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("polling_interval"), "{e}");
    let e = parse(&format!("{MINIMAL}logging_level: LOUD\n")).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("logging_level"));
}

#[test]
fn metrics_address_is_an_ip_address_all_by_default() {
    assert_eq!(parse(MINIMAL).unwrap().metrics_ip().to_string(), "0.0.0.0");
    for (given, ip) in [("127.0.0.1", "127.0.0.1"), ("\"::1\"", "::1"), ("\" 10.0.0.7 \"", "10.0.0.7")] {
        assert_eq!(parse(&format!("{MINIMAL}metrics_address: {given}\n")).unwrap().metrics_ip().to_string(), ip);
    }
    for bad in ["localhost", "127.0.0.1:9000", "\"\"", "[1]"] {
        let e = parse(&format!("{MINIMAL}metrics_address: {bad}\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("metrics_address"), "{bad}: {e}");
    }
}

#[test]
fn server_timeout_is_seconds_and_at_least_one() {
    assert_eq!(parse(&format!("{MINIMAL}server_timeout: 2\n")).unwrap().server_timeout(), Duration::from_secs(2));
    for bad in ["0", "-1", "soon", "1.5"] {
        let e = parse(&format!("{MINIMAL}server_timeout: {bad}\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("server_timeout"), "{bad}: {e}");
    }
}

#[test]
fn server_address_is_checked() {
    for good in
        ["10.0.0.5:8000", "http://tf", "https://tf.example.com/", "HTTP://h:1", "http://[::1]:5000", "tf_x.lab:65535"]
    {
        if good.starts_with("https") && !cfg!(feature = "tls") {
            continue;
        }
        assert!(parse(&MINIMAL.replace("10.0.0.5:8000", good)).is_ok(), "{good}");
    }
    for bad in [
        "htp://x",
        "ftp://x",
        "http://",
        "http://:80",
        "x:0",
        "x:99999",
        "x:port",
        "http://a b",
        "http://h?q=1",
        "http://h:",
    ] {
        let e = parse(&MINIMAL.replace("10.0.0.5:8000", &format!("{bad:?}"))).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("server_address"), "{bad}: {e}");
    }
}

#[test]
fn budget_keys_are_seconds() {
    let s = *parse(MINIMAL).unwrap().schedules();
    assert_eq!((s.output_interval, s.cancel_check), (raw::DEFAULT_OUTPUT_INTERVAL, raw::DEFAULT_CANCEL_INTERVAL));
    assert_eq!((s.output_interval, s.cancel_check), (Duration::from_secs(1), Duration::from_secs(3)));
    let c = parse(&format!("{MINIMAL}output_interval: 0.5\ncancel_check_interval: 10\nkill_grace: 2.5\n")).unwrap();
    assert_eq!(c.schedules().output_interval, Duration::from_millis(500));
    assert_eq!(c.schedules().cancel_check, Duration::from_secs(10));
    assert_eq!(c.kill_grace(), Duration::from_millis(2500));
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.kill_grace(), crate::runner::GRACE);
    for key in ["output_interval", "cancel_check_interval", "kill_grace"] {
        for bad in ["-1", "soon", "1e9"] {
            let e = parse(&format!("{MINIMAL}{key}: {bad}\n")).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{bad}: {e}");
        }
    }
}

#[test]
fn agent_ids_that_leave_the_path_are_refused() {
    for bad in ["../../etc", "..", "a/b", "a\\b", "a\tb"] {
        let e = parse(&MINIMAL.replace("a1", &format!("{bad:?}"))).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("agent_id"), "{bad}: {e}");
    }
    assert!(parse(&MINIMAL.replace("a1", "\"lab rig #1\"")).is_ok());
}

#[test]
fn server_ca_file_must_hold_a_certificate() {
    let e = parse(&format!("{MINIMAL}server_ca_file: /nonexistent/ca.pem\n")).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("server_ca_file"), "{e}");
    let e = parse(&format!("{MINIMAL}server_ca_file: /dev/null\n")).unwrap_err();
    assert!(e.reason.contains("no PEM certificate"), "{e}");
    assert!(parse(MINIMAL).unwrap().server_ca_file().is_none());
}

#[test]
fn error_is_one_line_whatever_the_input() {
    // Found by the config fuzz target: carriage returns in the excerpt.
    let e = parse("{0\r\"J\r\"J\r\rz\r").unwrap_err();
    let text = e.to_string();
    assert!(!text.contains('\n') && !text.contains('\r'), "{text:?}");
}

/// Issue 22: type errors said `expected f64`.
#[test]
fn type_errors_say_what_to_write_not_rust_types() {
    let reason = |line: &str| parse(&format!("{MINIMAL}{line}\n")).unwrap_err().to_string();
    let e = reason("polling_interval: soon");
    assert!(e.ends_with("key `polling_interval`: invalid type: string \"soon\", expected a number"), "{e}");
    let e = reason("server_timeout: -1");
    assert!(e.contains("expected a whole number, 0 or more"), "{e}");
    let e = reason("advertised_queues: [a]");
    assert!(e.ends_with("invalid type: a list, expected a YAML mapping"), "{e}");
    for line in ["polling_interval: soon", "server_timeout: 1.5", "advertised_images: 3"] {
        let e = reason(line);
        for rust in ["f64", "u64", "u32", "u16", "usize", "sequence"] {
            assert!(!e.contains(rust), "{e}");
        }
    }
}

#[test]
fn every_duration_key_has_a_range() {
    // (key, lowest and highest accepted, refused values)
    let table: [(&str, &str, &str, &[&str]); 7] = [
        (
            "global_timeout",
            "1",
            "31536000",
            &["0", "31536001", "18446744073709551615", "18446744073709551616", "1e300", "-1"],
        ),
        ("output_timeout", "1", "31536000", &["0", "31536001", "9223372036854775807", ".inf", "1.5"]),
        ("server_timeout", "1", "86400", &["0", "86401", "18446744073709551615"]),
        ("polling_interval", "0", "86400", &["86400.5", "1e300", ".inf", ".nan", "-0.1"]),
        ("output_interval", "0", "86400", &["1e9", ".nan"]),
        ("cancel_check_interval", "0", "86400", &["1e300", "-1"]),
        ("kill_grace", "0", "86400", &["1e300", ".inf"]),
    ];
    for (key, lo, hi, bad) in table {
        for good in [lo, hi] {
            assert!(parse(&format!("{MINIMAL}{key}: {good}\n")).is_ok(), "{key}: {good}");
        }
        for bad in bad {
            let e = parse(&format!("{MINIMAL}{key}: {bad}\n")).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{key}: {bad}: {e}");
        }
    }
    let e = parse(&format!("{MINIMAL}global_timeout: 18446744073709551615\n")).unwrap_err();
    assert_eq!(e.reason, "must be a whole number of seconds from 1 to 31536000");
    let e = parse(&format!("{MINIMAL}polling_interval: 1e300\n")).unwrap_err();
    assert_eq!(e.reason, "must be a number of seconds from 0 to 86400");
}

#[test]
fn settings_are_typed_once() {
    let c = parse(&format!(
        "{MINIMAL}polling_interval: 0.25\nidentifier: rig-7\nlocation: lab\nprovision_type: noprovision\n\
         setup_command: s\ncleanup_command: c\nadvertised_queues: {{q: a queue}}\nadvertised_images: {{q: {{img: url}}}}\n\
         logging_level: debug\nmin_free_mb: 0\n"
    ))
    .unwrap();
    let s = c.schedules();
    assert_eq!(s.poll, Duration::from_millis(250));
    assert_eq!(s.server_wait.first, Duration::from_millis(250));
    assert_eq!(s.kept.first, Duration::from_secs(1));
    assert_eq!(s.allocation_poll, Duration::from_millis(250));
    assert_eq!((c.identifier(), c.location(), c.provision_type()), (Some("rig-7"), Some("lab"), Some("noprovision")));
    assert_eq!((c.command(Phase::Setup), c.command(Phase::Cleanup), c.command(Phase::Test)), ("s", "c", ""));
    assert_eq!(c.advertised_queues().map(Json::to_string_compact).as_deref(), Some(r#"{"q":"a queue"}"#));
    assert_eq!(c.advertised_images().map(Json::to_string_compact).as_deref(), Some(r#"{"q":{"img":"url"}}"#));
    assert_eq!(c.logging_level(), LevelFilter::Debug);
    assert_eq!(c.min_free_mb(), 0);
    assert_eq!(c.job_queues(), ["q".to_string()]);
    assert_eq!((c.agent_id(), c.server_address()), ("a1", "10.0.0.5:8000"));
}

/// The first bad key in the file's order of checks is the one named, and
/// each check names its own key (the message says the range).
#[test]
fn each_check_names_its_key() {
    let cases = [
        ("agent_id: \"\"\nserver_address: s\njob_queues: [q]\n", "agent_id"),
        ("agent_id: a\nserver_address: \" \"\njob_queues: [q]\n", "server_address"),
        ("agent_id: a\nserver_address: s\njob_queues: []\n", "job_queues"),
        ("agent_id: a\nserver_address: s\njob_queues: [q]\nmin_free_mb: -1\n", "min_free_mb"),
        ("agent_id: a\nserver_address: s\njob_queues: [q]\nlogging_quiet: maybe\n", "logging_quiet"),
        ("agent_id: a\nserver_address: s\njob_queues: [q]\nkill_grace: -1\npolling_interval: -1\n", "polling_interval"),
    ];
    for (text, key) in cases {
        let e = parse(text).unwrap_err();
        assert_eq!(e.key.as_deref(), Some(key), "{text:?}: {e}");
        assert!(e.to_string().contains(&format!("key `{key}`")), "{e}");
    }
}

/// A key written twice (a hand-edited config) is refused naming that key,
/// at the line of its second writing, not at the start of the file.
#[test]
fn a_key_written_twice_is_named() {
    let e = parse(&format!("{MINIMAL}polling_interval: 5\ntest_command: a\ntest_command: b\n")).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("test_command"), "{e}");
    assert!(e.to_string().contains("key `test_command`"), "{e}");
    assert_eq!(e.line, Some(6), "{e}");
}

/// Upstream reads its config with PyYAML, whose booleans are YAML 1.1's:
/// `yes`/`no`/`on`/`off` in any of their three cases load there, so an
/// upstream config holding them must load here.
#[test]
fn yaml_1_1_booleans_load_as_upstream_reads_them() {
    for (word, value) in [("yes", true), ("Yes", true), ("ON", true), ("no", false), ("Off", false), ("True", true)] {
        let c = parse(&format!("{MINIMAL}logging_quiet: {word}\nmask_artifacts: {word}\n"));
        let c = c.unwrap_or_else(|e| panic!("{word}: {e}"));
        assert_eq!((c.logging_quiet(), c.mask_artifacts()), (value, value), "{word}");
    }
    // PyYAML reads `y` and `n` as strings: refused as upstream refuses them.
    let e = parse(&format!("{MINIMAL}logging_quiet: y\n")).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("logging_quiet"), "{e}");
}

/// A config saved with a UTF-8 byte order mark (some editors write one)
/// loads upstream (PyYAML skips it); here it made every key after the
/// first read as missing, and the error named a key that is there.
#[test]
fn a_byte_order_mark_is_skipped() {
    let c = parse(&format!("\u{feff}{MINIMAL}polling_interval: 5\n")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((c.agent_id(), c.schedules().poll), ("a1", Duration::from_secs(5)));
}

/// A file that is not a mapping of keys (a list, a bare word) says so,
/// not the name of a Rust struct.
#[test]
fn a_file_that_is_not_a_mapping_says_so_in_plain_words() {
    for text in ["- a\n- b\n", "just words\n"] {
        let e = parse(text).unwrap_err().to_string();
        assert!(!e.contains("RawConfig") && !e.contains("struct"), "{e}");
    }
}

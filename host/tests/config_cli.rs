//! `construir-host run`'s configuration file, through the real binary:
//! every key of the shipped example, precedence, and errors.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::{Command, Output};

fn host(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_construir-host")).args(args).output().expect("run construir-host")
}

/// `run --show-config` with `args`, as a table of key to value (unset keys absent).
fn shown(args: &[&str]) -> BTreeMap<String, toml::Value> {
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    all.push("--show-config");
    let out = host(&all);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("utf8");
    toml::from_str::<toml::Table>(&text).expect("show-config prints TOML").into_iter().collect()
}

/// Every key `--show-config` can print, set or not.
fn all_keys() -> Vec<String> {
    let out = host(&["run", "q", "--config", "/dev/null", "--show-config"]);
    String::from_utf8(out.stdout)
        .expect("utf8")
        .lines()
        .map(|l| l.trim_start_matches("# ").split(" = ").next().expect("key").to_owned())
        .collect()
}

fn example() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/host/host.toml");
    fs::read_to_string(path).expect("config/host/host.toml")
}

#[test]
fn every_key_of_the_example_is_accepted_and_its_values_are_the_defaults() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // Uncomment every `# key = value` line.
    let uncommented: String = example()
        .lines()
        .filter_map(|l| l.strip_prefix("# ").filter(|rest| rest.contains(" = ")))
        .map(|l| format!("{l}\n"))
        .collect();
    let file = tmp.path().join("host.toml");
    fs::write(&file, &uncommented).expect("write");
    let from_example = shown(&["--config", file.to_str().expect("utf8")]);
    let defaults = shown(&["q", "--config", "/dev/null"]);
    for (key, value) in &defaults {
        if key != "queue" {
            assert_eq!(from_example.get(key), Some(value), "the example's {key} is not the default");
        }
    }
    let example_keys: Vec<&str> = uncommented.lines().map(|l| l.split(" = ").next().expect("key")).collect();
    for key in all_keys() {
        assert!(example_keys.contains(&key.as_str()), "the example lacks {key}");
        assert!(from_example.contains_key(&key), "{key} from the example was not taken");
    }
}

#[test]
fn the_command_line_wins_over_the_file_and_the_file_over_the_defaults() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("host.toml");
    fs::write(&file, "queue = \"/srv/q\"\ntimeout = \"1h\"\nworkers = 3\nenable-networking = true\n").expect("write");
    let f = file.to_str().expect("utf8");
    let got = shown(&["--config", f, "--workers", "2"]);
    assert_eq!(got["queue"].as_str(), Some("/srv/q"));
    assert_eq!(got["timeout"].as_str(), Some("1h"));
    assert_eq!(got["workers"].as_integer(), Some(2));
    assert_eq!(got["enable-networking"].as_bool(), Some(true));
    assert_eq!(got["memory"].as_str(), Some("2G"), "untouched keys keep their defaults");
    let got = shown(&["/elsewhere", "--config", f]);
    assert_eq!(got["queue"].as_str(), Some("/elsewhere"), "QUEUE on the command line wins");
}

#[test]
fn unknown_keys_bad_values_and_missing_files_are_one_line_errors_naming_them() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let table: &[(&str, &str)] = &[
        ("timout = \"3h\"", "unknown key `timout`"),
        ("memory = \"lots\"", "key `memory`: invalid value 'lots' for '--memory"),
        ("workers = 0", "key `workers`: invalid value '0' for '--workers"),
        ("accel = \"xen\"", "key `accel`: invalid value 'xen' for '--accel"),
        ("once = 1", "key `once`: must be true or false"),
        ("timeout = [1]", "key `timeout`: must be a string or a whole number"),
        ("timeout = ", "is not valid TOML"),
    ];
    for (i, (text, want)) in table.iter().enumerate() {
        let file = tmp.path().join(format!("bad{i}.toml"));
        fs::write(&file, text).expect("write");
        let out = host(&["run", "q", "--config", file.to_str().expect("utf8"), "--show-config"]);
        assert!(!out.status.success(), "{text} was accepted");
        let err = String::from_utf8(out.stderr).expect("utf8");
        assert!(err.starts_with("construir-host: error: "), "{err}");
        assert!(err.contains(&format!("{}", file.display())) && err.contains(want), "{text}: {err}");
    }
    let out = host(&["run", "q", "--config", "/nonexistent/host.toml"]);
    let err = String::from_utf8(out.stderr).expect("utf8");
    assert!(!out.status.success() && err.contains("cannot read /nonexistent/host.toml"), "{err}");
    let out = host(&["run", "--config", "/dev/null"]);
    let err = String::from_utf8(out.stderr).expect("utf8");
    assert!(!out.status.success() && err.contains("no queue: give QUEUE"), "{err}");
}

#[test]
fn man_pages_and_completions_come_from_the_command_line_definitions() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = host(&["man", tmp.path().to_str().expect("utf8")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut pages: Vec<String> = fs::read_dir(tmp.path())
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    for want in [
        "construir-host.1",
        "construir-host-run.1",
        "construir-host-doctor.1",
        "construir-host-status.1",
        "construir-host-job-pack.1",
    ] {
        assert!(pages.contains(&want.to_owned()), "{want} missing: {pages:?}");
    }
    let run = fs::read_to_string(tmp.path().join("construir-host-run.1")).expect("page");
    assert!(run.starts_with(".ie") || run.contains(".TH construir-host-run 1"), "{run}");
    for option in ["\\-\\-stop\\-timeout", "\\-\\-metrics\\-file", "\\-\\-show\\-config", "/etc/construir/host.toml"] {
        assert!(run.contains(option), "{option} not in the run page");
    }
    for (shell, marker) in
        [("bash", "complete -F"), ("zsh", "#compdef construir-host"), ("fish", "complete -c construir-host")]
    {
        let out = host(&["completions", shell]);
        let text = String::from_utf8(out.stdout).expect("utf8");
        assert!(out.status.success() && text.contains(marker), "{shell}: {text}");
        assert!(text.contains("doctor") && text.contains("status"), "{shell} lacks subcommands");
    }
}

/// `run --once` on an empty queue, stderr into `log`, with `env` set.
fn run_once_logging(dir: &Path, log: &Path, extra: &[&str], env: &[(&str, String)]) -> String {
    let stderr = fs::File::create(log).expect("log file");
    let status = Command::new(env!("CARGO_BIN_EXE_construir-host"))
        .args(["run", "--config", "/dev/null", "--once", "--accel", "tcg", "--host-id", "logtest"])
        .arg(dir.join("queue"))
        .args(extra)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stderr(stderr)
        .status()
        .expect("run");
    let text = fs::read_to_string(log).expect("read log");
    assert!(status.success(), "{text}");
    text
}

#[test]
fn under_the_journal_lines_carry_priorities_and_no_time_and_json_is_one_object_a_line() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    fs::create_dir(tmp.path().join("queue")).expect("mkdir");
    let log = tmp.path().join("stderr");
    // Plain: a time of our own first.
    let text = run_once_logging(tmp.path(), &log, &[], &[]);
    let last = text.lines().last().expect("a line");
    assert!(last.starts_with("20") && last.contains("Z INFO  finished: 0 done"), "{text}");
    // systemd names the stream it connected in JOURNAL_STREAM (device:inode); a file stands in for it here.
    fs::write(&log, "").expect("create");
    let meta = fs::metadata(&log).expect("stat");
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    let text = run_once_logging(tmp.path(), &log, &[], &[("JOURNAL_STREAM", stream)]);
    assert!(text.lines().all(|l| l.starts_with("<6>") || l.starts_with("<4>") || l.starts_with("<3>")), "{text}");
    assert!(text.contains("<6>finished: 0 done, 0 failed, 0 refused, 0 requeued\n"), "{text}");
    // A JOURNAL_STREAM naming another stream is not the journal.
    let text = run_once_logging(tmp.path(), &log, &[], &[("JOURNAL_STREAM", "1:2".into())]);
    assert!(text.lines().all(|l| l.starts_with("20")), "{text}");
    // JSON for log shippers.
    let text = run_once_logging(tmp.path(), &log, &["--log-format", "json"], &[]);
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["time"].is_string() && v["level"].is_string() && v["message"].is_string(), "{line}");
    }
    assert!(text.contains(r#""message":"finished: 0 done, 0 failed, 0 refused, 0 requeued""#), "{text}");
}

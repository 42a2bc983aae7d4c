//! Debian's Bazel 4.2.3 builds remotely on `casbuild up`: genrule chains, a
//! cc_library + cc_binary with headers in subdirectories, an sh_test; a clean
//! rebuild is all remote cache hits; a genrule reading an undeclared file
//! fails with casbuild's hermeticity report in Bazel's output.

mod common;

use std::process::Command;

use common::Coordinator;

fn available() -> bool {
    common::needs_root("bazel_remote_execution", true) && common::bazel::available("bazel_remote_execution")
}

#[test]
fn bazel_builds_and_tests_remotely_on_casbuild_up() {
    if !available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws");
    common::bazel::sample_workspace(&ws);
    let up = Coordinator::start_up_with(&dir.path().join("casbuild"), &["--metrics-listen", "127.0.0.1:0"]);
    let root = dir.path().join("bazel-root");
    let mut flags = common::bazel::offline_repositories(&dir.path().join("repos"));
    flags.push(format!("--remote_executor={}", up.url()));
    // What the metrics endpoint says now, summed over the labels given.
    let metrics = up.metrics_addr();
    let scrape = || common::http::get(&metrics, "/metrics").1;
    let count = |text: &str, name: &str, labels: &[(&str, &str)]| common::http::sample(text, name, labels);
    let run = |verb: &str, targets: &[&str]| {
        let mut args = vec![verb.to_owned()];
        args.extend(flags.iter().cloned());
        args.extend(targets.iter().map(|t| t.to_string()));
        common::bazel::run(&ws, &root, &args)
    };

    let (ok, first) = run("build", &["//pkg:c", "//pkg:app"]);
    assert!(ok, "{first}");
    let executed = common::bazel::processes(&first, " remote");
    assert!(executed >= 6, "genrules, compiles and the link ran remotely:\n{first}");
    // Every action Bazel ran remotely finished on casbuild, successfully.
    let cold = scrape();
    let finished = |text: &str, outcome| count(text, "casbuild_actions_finished_total", &[("outcome", outcome)]);
    assert_eq!(finished(&cold, "success"), f64::from(executed), "{cold}");
    assert_eq!(std::fs::read_to_string(ws.join("bazel-bin/pkg/c.txt")).unwrap(), "HELLO\nHELLO\nSOME INPUT\n");
    let app = Command::new(ws.join("bazel-bin/pkg/app")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&app.stdout), "42\n", "the remotely built binary runs");

    let (ok, tested) = run("test", &["//pkg:t"]);
    assert!(ok && tested.contains("PASSED"), "{tested}");

    assert!(common::bazel::run(&ws, &root, &["clean"]).0);
    let before = scrape();
    let (ok, second) = run("build", &["//pkg:c", "//pkg:app"]);
    assert!(ok, "{second}");
    assert_eq!(
        common::bazel::processes(&second, " remote cache hit"),
        executed,
        "a clean rebuild is all cache hits:\n{second}"
    );
    assert_eq!(common::bazel::processes(&second, " remote"), 0, "{second}");
    // The metrics saw exactly that: one cache hit per action, nothing run.
    let after = scrape();
    let hits = |text: &str| count(text, "casbuild_action_cache_lookups_total", &[("result", "hit")]);
    assert_eq!(hits(&after) - hits(&before), f64::from(executed), "{after}");
    let all_finished = |text: &str| count(text, "casbuild_actions_finished_total", &[]);
    assert_eq!(all_finished(&after), all_finished(&before), "nothing executed on the warm build");

    let (ok, sneaky) = run("build", &["//pkg:sneaky"]);
    assert!(!ok, "reading an undeclared file fails:\n{sneaky}");
    assert!(
        sneaky.contains("undeclared input: pkg/secret.txt (lookup: not found)"),
        "Bazel shows casbuild's hermeticity report:\n{sneaky}"
    );
    let last = scrape();
    assert_eq!(count(&last, "casbuild_hermeticity_violations_total", &[]), 1.0, "{last}");
    assert_eq!(finished(&last, "failure"), 1.0, "{last}");
    up.stop();
}

//! A real Bazel (Debian's bazel-bootstrap 4.2.3) uses casbuild as its remote
//! cache: after `bazel clean`, a rebuild is served entirely from the cache.

mod common;

use std::path::Path;

use common::Coordinator;

/// Runs bazel and insists that it succeeds.
fn bazel(workspace: &Path, output_root: &Path, args: &[&str]) -> String {
    let (ok, text) = common::bazel::run(workspace, output_root, args);
    assert!(ok, "bazel {args:?} failed:\n{text}");
    text
}

fn remote_cache_hits(output: &str) -> u32 {
    common::bazel::processes(output, " remote cache hit")
}

#[test]
fn a_clean_rebuild_is_served_from_the_remote_cache() {
    if !common::bazel::available("bazel_remote_cache") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let workspace = dir.path().join("ws");
    common::bazel::package(
        &workspace,
        r#"
genrule(name = "a", outs = ["a.txt"], cmd = "echo hello > $@")
genrule(name = "b", srcs = [":a"], outs = ["b.txt"], cmd = "cat $< $< > $@")
genrule(name = "c", srcs = [":b", "input.txt"], outs = ["c.txt"], cmd = "cat $(SRCS) | tr a-z A-Z > $@")
# Large enough that Bazel moves it through ByteStream rather than a batch call.
genrule(name = "big", outs = ["big.bin"], cmd = "head -c 9000000 /dev/urandom > $@")
"#,
    );
    std::fs::write(workspace.join("pkg/input.txt"), "some input\n").unwrap();
    let server = Coordinator::start(&dir.path().join("storage"), &[]);
    let output_root = dir.path().join("bazel-root");
    let remote = format!("--remote_cache={}", server.url());
    let targets = ["//pkg:c", "//pkg:big"];
    let build = |extra: &[&str]| {
        let mut args = vec!["build", "--spawn_strategy=local", remote.as_str()];
        args.extend_from_slice(extra);
        args.extend_from_slice(&targets);
        bazel(&workspace, &output_root, &args)
    };

    let first = build(&[]);
    assert_eq!(remote_cache_hits(&first), 0, "{first}");
    let c = std::fs::read_to_string(workspace.join("bazel-bin/pkg/c.txt")).unwrap();
    assert_eq!(c, "HELLO\nHELLO\nSOME INPUT\n");
    let big = std::fs::read(workspace.join("bazel-bin/pkg/big.bin")).unwrap();

    bazel(&workspace, &output_root, &["clean"]);
    let second = build(&[]);
    assert_eq!(remote_cache_hits(&second), 4, "every action is a remote cache hit:\n{second}");
    assert_eq!(std::fs::read_to_string(workspace.join("bazel-bin/pkg/c.txt")).unwrap(), c);
    assert_eq!(
        std::fs::read(workspace.join("bazel-bin/pkg/big.bin")).unwrap(),
        big,
        "the random output came from the cache"
    );

    // Another instance name is another namespace: nothing is cached there yet.
    bazel(&workspace, &output_root, &["clean"]);
    let other = build(&["--remote_instance_name=team/other"]);
    assert_eq!(remote_cache_hits(&other), 0, "{other}");
}

//! `casbuild exec` as a user runs it against a real coordinator: a command
//! over a local directory, a stored action by digest, failures with the
//! hermeticity report, and bad input. Needs root (FUSE, namespaces).

mod common;

use std::process::Output;

use std::path::Path;

use casbuild_cas::digest::{Digest, DigestFunction};
use casbuild_proto::reapi::GetActionResultRequest;
use common::{casbuild, needs_root, Coordinator};
use tonic::Code;

/// A coordinator and a private cache directory for the exec processes.
struct Env {
    dir: tempfile::TempDir,
    server: Coordinator,
}

impl Env {
    fn start(test: &str) -> Option<Env> {
        if !needs_root(test, true) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let server = Coordinator::start(&dir.path().join("storage"), &[]);
        Some(Env { dir, server })
    }

    fn exec(&self, args: &[&str]) -> Output {
        casbuild()
            .arg("exec")
            .args(["--remote", &self.server.url()])
            .args(args)
            .env("XDG_CACHE_HOME", self.dir.path().join("xdg"))
            .output()
            .unwrap()
    }

    fn source(&self, name: &str, files: &[(&str, &str)]) -> String {
        let root = self.dir.path().join(name);
        for (path, contents) in files {
            let path = root.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, contents).unwrap();
        }
        root.to_str().unwrap().to_owned()
    }

    fn cached(&self, action: &Digest) -> Result<casbuild_proto::reapi::ActionResult, tonic::Status> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let mut client = self.server.action_cache().await;
            let request = GetActionResultRequest {
                action_digest: Some(action.to_proto()),
                digest_function: DigestFunction::Blake3.to_proto() as i32,
                ..Default::default()
            };
            client.get_action_result(request).await.map(|r| r.into_inner())
        })
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The action digest `casbuild exec` reports on stderr.
fn action_of(out: &Output) -> Digest {
    let stderr = text(&out.stderr);
    let line = stderr.lines().find_map(|l| l.strip_prefix("casbuild: action ")).expect("the action is reported");
    Digest::parse(DigestFunction::Blake3, line.trim()).unwrap()
}

#[test]
fn a_command_over_a_directory_runs_remotely_and_its_outputs_come_back() {
    let Some(env) = Env::start("a_command_over_a_directory_runs_remotely") else { return };
    let src = env.source(
        "src",
        &[
            ("main.c", "#include \"inc/v.h\"\nint main(void) { return V; }\n"),
            ("inc/v.h", "#define V 0\n"),
            ("unused.txt", "never read\n"),
        ],
    );
    let out_dir = env.dir.path().join("out");
    let out = env.exec(&[
        "--input",
        &src,
        "--out",
        out_dir.to_str().unwrap(),
        "--output",
        "bin/main",
        "--output",
        "logs",
        "--output",
        "latest",
        "--show-unread",
        "--",
        "sh",
        "-c",
        "cc -o bin/main main.c && mkdir -p logs && echo built > logs/build.txt && ln -s bin/main latest \
         && echo to-stdout",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "to-stdout\n", "the command's stdout is replayed");
    let binary = out_dir.join("bin/main");
    assert!(std::process::Command::new(&binary).status().unwrap().success(), "the compiled program runs on the host");
    assert_eq!(std::fs::read_to_string(out_dir.join("logs/build.txt")).unwrap(), "built\n");
    assert_eq!(std::fs::read_link(out_dir.join("latest")).unwrap(), Path::new("bin/main"));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("unread input: unused.txt"), "declared but unread inputs are listed: {stderr}");
    assert!(!stderr.contains("unread input: main.c"), "{stderr}");

    // The result is in the action cache, and running the stored action by digest gives it again.
    let action = action_of(&out);
    let cached = env.cached(&action).expect("a successful action is cached");
    assert_eq!(cached.exit_code, 0);
    assert_eq!(cached.output_files[0].path, "bin/main");
    assert!(cached.output_files[0].is_executable);
    let again = env.exec(&["--no-cache", &action.to_string()]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    let printed = text(&again.stdout);
    assert!(printed.contains("exit_code: 0") && printed.contains("output_file: bin/main"), "{printed}");
    assert!(printed.contains("output_directory: logs tree"), "{printed}");
}

#[test]
fn a_failing_action_names_the_undeclared_input_and_is_not_cached() {
    let Some(env) = Env::start("a_failing_action_names_the_undeclared_input") else { return };
    let src = env.source("gen", &[("BUILD", "genrule\n")]);
    let out = env.exec(&["--input", &src, "--output", "out.txt", "--", "sh", "-c", "cat data/config.txt > out.txt"]);
    assert_eq!(out.status.code(), Some(1), "the command's exit status: {}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("undeclared input: data (lookup: not found)"), "{stderr}");
    assert!(stderr.contains("No such file or directory"), "the command's own stderr is replayed: {stderr}");
    assert_eq!(env.cached(&action_of(&out)).unwrap_err().code(), Code::NotFound, "failures are not cached");

    // An absolute host path (a workspace's) is named too; what the sandbox
    // itself has at its top is not.
    let out =
        env.exec(&["--input", &src, "--", "sh", "-c", "ls /proc /tmp >/dev/null; cat /home/alice/ws/data/config.txt"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("undeclared input: /home (lookup: not found)"), "{stderr}");
    let named = stderr.lines().filter(|l| l.contains("undeclared input:")).count();
    assert_eq!(named, 1, "only the host path is named: {stderr}");
    // The root shows what the sandbox put there and nothing the host lacks.
    let out = env.exec(&["--input", &src, "--", "sh", "-c", "ls -A / >&2; exit 2"]);
    for name in text(&out.stderr).lines().filter(|l| !l.starts_with("casbuild:")) {
        let known = ["proc", "dev", "tmp", "etc", "work"].contains(&name) || Path::new("/").join(name).exists();
        assert!(known, "/{name} in the sandbox: {}", text(&out.stderr));
    }

    let out = env.exec(&["--input", &src, "--timeout", "1", "--", "sh", "-c", "sleep 600 & sleep 300"]);
    assert_eq!(out.status.code(), Some(128 + 9), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("timed out"), "{}", text(&out.stderr));
    let scratch_left = std::fs::read_dir(env.dir.path().join("xdg/casbuild"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("exec-"))
        .count();
    assert_eq!(scratch_left, 0, "scratch space and the mount point are removed after a timeout");
    let out = env.exec(&["--input", &src, "--", "sh", "-c", "exit 3"]);
    assert_eq!(out.status.code(), Some(3));
    let out = env.exec(&["--input", &src, "--", "no-such-compiler", "-c", "x.c"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(text(&out.stderr).contains("command not found"), "{}", text(&out.stderr));
}

#[test]
fn bad_input_is_refused_with_a_message() {
    let Some(env) = Env::start("bad_input_is_refused_with_a_message") else { return };
    let src = env.source("bad", &[("a.txt", "a")]);
    let out = env.exec(&["--input", &src, "--output", "../escape", "--", "true"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("output path \"../escape\""), "{}", text(&out.stderr));
    let out = env.exec(&["--input", &src, "--output", "a", "--output", "a/b", "--", "true"]);
    assert!(text(&out.stderr).contains("collide"), "{}", text(&out.stderr));
    let absent = DigestFunction::Blake3.digest_of(b"no such action");
    let out = env.exec(&[&absent.to_string()]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("lacks blobs"), "{}", text(&out.stderr));
    let out = env.exec(&["--", "true"]);
    assert!(text(&out.stderr).contains("give either ACTION_DIGEST"), "{}", text(&out.stderr));
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!info.contains(env.dir.path().to_str().unwrap()), "nothing stays mounted");
}

#[test]
fn outputs_over_the_total_limit_are_not_returned() {
    let Some(env) = Env::start("outputs_over_the_total_limit_are_not_returned") else { return };
    let input = env.source("big", &[("README", "two different outputs of 700 KiB each\n")]);
    let script = "head -c 716800 /dev/zero > a.bin; head -c 716800 /dev/urandom > b.bin; echo made both";
    let out = env.exec(&[
        "--max-output-size",
        "1MiB",
        "--input",
        &input,
        "--output",
        "a.bin",
        "--output",
        "b.bin",
        "--",
        "sh",
        "-c",
        script,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("over this worker's limit of 1048576"), "{stderr}");
    assert!(stderr.contains("no outputs were returned"), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "made both\n", "the logs still come back");
    assert!(!Path::new(&input).join("a.bin").exists() && !Path::new(&input).join("b.bin").exists());
    // Under the limit, the same command returns both.
    let out = env.exec(&["--input", &input, "--output", "a.bin", "--output", "b.bin", "--", "sh", "-c", script]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::metadata(Path::new(&input).join("a.bin")).unwrap().len(), 716800);
}

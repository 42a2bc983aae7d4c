//! `casbuild cc` under make, against `casbuild up`: the zstd library sources
//! shipped in the zstd-sys crate (40 `.c` files in nested directories) and the
//! Lua 5.4 sources of the lua-src crate, each built by a Makefile written here
//! with `make -j8 CC="casbuild cc gcc"` and linked with a driver (a zstd round
//! trip; a Lua script whose output is checked). Objects and dependency files
//! equal those of a local build; clean rebuilds are all cache hits (through
//! `--show-stats`); with the cluster stopped the build still succeeds through
//! local fallback. Needs root (the worker's FUSE mount and sandbox).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{needs_root, Coordinator};

/// `sub` inside the sources of the crate `name-*` cargo fetched for this workspace.
fn crate_sources(name: &str, sub: &str) -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cargo"));
    let registry = home.join("registry/src");
    for index in std::fs::read_dir(&registry).expect("cargo's registry sources") {
        for krate in std::fs::read_dir(index.unwrap().path()).unwrap() {
            let path = krate.unwrap().path();
            let dir = path.file_name().unwrap().to_string_lossy().into_owned();
            if dir.starts_with(&format!("{name}-")) && path.join(sub).is_dir() {
                return path.join(sub);
            }
        }
    }
    panic!("no {name} sources with {sub} under {}", registry.display());
}

/// A project directory: `sources` under lib/, the Makefile, the driver.
fn project(dir: &Path, sources: &Path, makefile: &str, driver: &str) -> PathBuf {
    let project = dir.to_path_buf();
    std::fs::create_dir_all(&project).unwrap();
    let status = Command::new("cp").arg("-r").arg(sources).arg(project.join("lib")).status().unwrap();
    assert!(status.success());
    std::fs::write(project.join("Makefile"), makefile).unwrap();
    std::fs::write(project.join("driver.c"), driver).unwrap();
    project
}

fn make(project: &Path, cc: &str, remote: &str, daemons: &Path, target: &str) -> Output {
    Command::new("make")
        .args(["-j8", target])
        .arg(format!("CC={cc}"))
        .current_dir(project)
        .env("CASBUILD_REMOTE", remote)
        .env("CASBUILD_DAEMON_DIR", daemons)
        .output()
        .expect("running make")
}

/// `casbuild cc FLAG` for the daemon of `remote` in `daemons`.
fn control(remote: &str, daemons: &Path, flag: &str) -> String {
    let out = common::casbuild()
        .args(["cc", flag])
        .env("CASBUILD_REMOTE", remote)
        .env("CASBUILD_DAEMON_DIR", daemons)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The count on the `--show-stats` line starting with `name`.
fn stat(stats: &str, name: &str) -> u64 {
    let line = stats.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name:?} in\n{stats}"));
    line.split_whitespace().last().unwrap().parse().unwrap()
}

/// Stops the daemons a test started (by asking them), even when it fails.
struct Daemons {
    dir: PathBuf,
    remote: String,
}

impl Drop for Daemons {
    fn drop(&mut self) {
        let _ = common::casbuild()
            .args(["cc", "--stop-daemon"])
            .env("CASBUILD_REMOTE", &self.remote)
            .env("CASBUILD_DAEMON_DIR", &self.dir)
            .output();
    }
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Every file under `root` with `extension`, relative to root.
fn files(root: &Path, extension: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == extension) {
                found.push(path.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    found.sort();
    found
}

/// Builds `sources` with `makefile` and `driver` through the wrapper against
/// `casbuild up`: objects equal a local build's, a clean rebuild is all cache
/// hits (L1, then remote once the daemon restarts), and the build succeeds
/// through local fallback with the cluster stopped. `check` runs the product.
fn build_through_the_wrapper(name: &str, sources: &Path, makefile: &str, driver: &str, check: impl Fn(&Path)) {
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start_up(&dir.path().join("up"));
    let remote = server.url();
    let daemons = dir.path().join("daemons");
    let _daemons = Daemons { dir: daemons.clone(), remote: remote.clone() };
    let wrapped = project(&dir.path().join("wrapped"), sources, makefile, driver);
    let local = project(&dir.path().join("local"), sources, makefile, driver);
    let cc = format!("{} cc gcc", env!("CARGO_BIN_EXE_casbuild"));
    let units = files(&wrapped.join("lib"), "c").len() as u64 + 1;

    let out = make(&wrapped, &cc, &remote, &daemons, "all");
    assert!(out.status.success(), "{name}: {}", text(&out));
    assert!(!text(&out).contains("locally"), "{name}: nothing fell back:\n{}", text(&out));
    check(&wrapped);
    let stats = control(&remote, &daemons, "--show-stats");
    assert_eq!(stat(&stats, "Compile requests"), units, "{stats}");
    assert_eq!(stat(&stats, "Executed remotely"), units, "{stats}");
    assert_eq!(stat(&stats, "Lookups skipped by the existence filter"), units, "all certain misses:\n{stats}");
    assert_eq!(stat(&stats, "Not sent"), 1, "the link ran locally:\n{stats}");

    // The same build with plain gcc: byte-identical objects and dependency files.
    let out = make(&local, "gcc", &remote, &daemons, "all");
    assert!(out.status.success(), "{}", text(&out));
    let objects = files(&wrapped, "o");
    assert_eq!(objects.len() as u64, units, "one object per source and the driver");
    for relative in objects.iter().chain(&files(&wrapped, "d")) {
        let ours = std::fs::read(wrapped.join(relative)).unwrap();
        let theirs = std::fs::read(local.join(relative)).unwrap();
        assert!(ours == theirs, "{name}: {} differs from a local compile", relative.display());
    }

    // A clean rebuild: every compile a hit in the daemon's L1.
    control(&remote, &daemons, "--zero-stats");
    assert!(make(&wrapped, &cc, &remote, &daemons, "clean").status.success());
    let out = make(&wrapped, &cc, &remote, &daemons, "all");
    assert!(out.status.success(), "{}", text(&out));
    let stats = control(&remote, &daemons, "--show-stats");
    assert_eq!(stat(&stats, "Cache hits (L1"), units, "{stats}");
    assert_eq!(stat(&stats, "Executed remotely"), 0, "{stats}");
    check(&wrapped);

    // A new daemon (empty L1): every compile a hit in the cluster's cache.
    control(&remote, &daemons, "--stop-daemon");
    assert!(make(&wrapped, &cc, &remote, &daemons, "clean").status.success());
    let out = make(&wrapped, &cc, &remote, &daemons, "all");
    assert!(out.status.success(), "{}", text(&out));
    let stats = control(&remote, &daemons, "--show-stats");
    assert_eq!(stat(&stats, "Cache hits (remote)"), units, "{stats}");
    assert_eq!(stat(&stats, "Executed remotely"), 0, "{stats}");
    assert_eq!(stat(&stats, "Bytes uploaded"), 0, "hits upload nothing:\n{stats}");

    // The cluster goes away (and a new daemon has nothing in memory): the
    // build still succeeds, every compile local with one warning line.
    drop(server);
    control(&remote, &daemons, "--stop-daemon");
    assert!(make(&wrapped, &cc, &remote, &daemons, "clean").status.success());
    let out = make(&wrapped, &cc, &remote, &daemons, "all");
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("casbuild cc: compiling driver.c locally: cluster unreachable"), "{log}");
    assert_eq!(log.matches("casbuild cc: compiling").count() as u64, units, "{log}");
    check(&wrapped);
    let stats = control(&remote, &daemons, "--show-stats");
    assert_eq!(stat(&stats, "Local fallbacks"), units, "{stats}");
}

#[test]
fn zstd_builds_through_the_wrapper() {
    if !needs_root("zstd_builds_through_the_wrapper", true) {
        return;
    }
    build_through_the_wrapper(
        "zstd",
        &crate_sources("zstd-sys", "zstd/lib"),
        include_str!("fixtures/cc/zstd.mk"),
        include_str!("fixtures/cc/zstd_driver.c"),
        |project| {
            let run = Command::new(project.join("roundtrip")).arg(project.join("Makefile")).output().unwrap();
            assert!(String::from_utf8_lossy(&run.stdout).starts_with("ok "), "{}", text(&run));
        },
    );
}

#[test]
fn lua_builds_through_the_wrapper() {
    if !needs_root("lua_builds_through_the_wrapper", true) {
        return;
    }
    build_through_the_wrapper(
        "lua",
        &crate_sources("lua-src", "lua-5.4.7"),
        include_str!("fixtures/cc/lua.mk"),
        include_str!("fixtures/cc/lua_driver.c"),
        |project| {
            let run = Command::new(project.join("driver")).output().unwrap();
            assert_eq!(String::from_utf8_lossy(&run.stdout), "squares=385 Lua 5.4\n", "{}", text(&run));
        },
    );
}

#[test]
fn bad_invocations_get_the_compilers_own_answer() {
    let dir = tempfile::tempdir().unwrap();
    let casbuild = |args: &[&str]| {
        common::casbuild()
            .arg("cc")
            .args(args)
            .current_dir(dir.path())
            .env("CASBUILD_REMOTE", "grpc://127.0.0.1:1")
            .output()
            .unwrap()
    };
    let out = casbuild(&[]);
    assert!(!out.status.success());
    assert!(text(&out).contains("give the compiler and its arguments"), "{}", text(&out));
    let out = casbuild(&["no-such-compiler-here", "-c", "x.c"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(text(&out).contains(r#"compiler "no-such-compiler-here" not found on PATH"#), "{}", text(&out));
    // A missing source: exactly what gcc itself says, no casbuild warning.
    let ours = casbuild(&["gcc", "-c", "missing.c", "-o", "missing.o"]);
    let theirs =
        Command::new("gcc").args(["-c", "missing.c", "-o", "missing.o"]).current_dir(dir.path()).output().unwrap();
    assert_eq!(ours.status.code(), theirs.status.code());
    assert_eq!(text(&ours), text(&theirs));
}

#[test]
fn remote_workers_run_compiles_only_with_the_same_compiler() {
    if !needs_root("remote_workers_run_compiles_only_with_the_same_compiler", true) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(&dir.path().join("store"), &[]);
    let remote = server.url();
    let daemons = dir.path().join("daemons");
    let _daemons = Daemons { dir: daemons.clone(), remote: remote.clone() };
    let project = dir.path().join("p");
    std::fs::create_dir_all(&project).unwrap();
    std::fs::write(project.join("x.c"), "int x(void) { return 7; }\n").unwrap();
    let compile = || {
        common::casbuild()
            .args(["cc", "gcc", "-O2", "-c", "x.c", "-o", "x.o"])
            .current_dir(&project)
            .env("CASBUILD_REMOTE", &remote)
            .env("CASBUILD_DAEMON_DIR", &daemons)
            .output()
            .unwrap()
    };

    // A worker without the compiler: the cluster says so at once and the
    // compile happens here.
    let plain = common::start_worker(&server, dir.path(), 1, &[]);
    let out = compile();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("no worker offers the platform this action needs: casbuild-compiler="),
        "{}",
        text(&out)
    );
    drop(plain);

    // A worker offering it runs the compile.
    let _worker = common::start_worker(&server, dir.path(), 2, &["--compiler", "gcc"]);
    let out = compile();
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("locally"), "{}", text(&out));
    let stats = control(&remote, &daemons, "--show-stats");
    assert_eq!(stat(&stats, "Executed remotely"), 1, "{stats}");
    assert_eq!(stat(&stats, "Local fallbacks"), 1, "{stats}");
}

#[test]
fn diagnostics_and_exit_codes_match_a_local_compile() {
    if !needs_root("diagnostics_and_exit_codes_match_a_local_compile", true) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start_up(&dir.path().join("up"));
    let remote = server.url();
    let daemons = dir.path().join("daemons");
    let _daemons = Daemons { dir: daemons.clone(), remote: remote.clone() };
    // The daemon, started by hand to serve metrics (the wrapper finds it
    // on the socket of this remote).
    let daemon = Coordinator::spawn_with(
        common::casbuild()
            .args(["daemon", "--remote", &remote, "--metrics-listen", "127.0.0.1:0"])
            .env("CASBUILD_DAEMON_DIR", &daemons),
        "metrics on http://",
        &daemons,
        false,
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let socket = || {
        std::fs::read_dir(&daemons)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.path().extension() == Some("sock".as_ref()))
    };
    while !socket() {
        assert!(std::time::Instant::now() < deadline, "the daemon never made its socket");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let project = dir.path().join("p");
    std::fs::create_dir_all(project.join("src")).unwrap();
    std::fs::write(project.join("src/warn.c"), "int f(void) {\n    int unused;\n    return 1;\n}\n").unwrap();
    std::fs::write(project.join("src/error.c"), "int g(void) {\n    return missing_name;\n}\n").unwrap();
    let run = |program: &str, pre: &[&str], source: &str| {
        let out = Command::new(program)
            .args(pre)
            .args(["-Wall", "-c", source, "-o", "out.o"])
            .current_dir(&project)
            .env("CASBUILD_REMOTE", &remote)
            .env("CASBUILD_DAEMON_DIR", &daemons)
            .env("LC_ALL", "C.UTF-8")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let casbuild = env!("CARGO_BIN_EXE_casbuild");
    for source in ["src/warn.c", "src/error.c"] {
        let ours = run(casbuild, &["cc", "gcc"], source);
        let theirs = run("gcc", &[], source);
        assert_eq!(ours, theirs, "{source}: the wrapper's exit code and messages equal gcc's");
        assert!(!theirs.2.is_empty(), "{source} has diagnostics to compare");
    }
    let stats = control(&remote, &daemons, "--show-stats");
    assert_eq!(stat(&stats, "Executed remotely"), 2, "both ran on the cluster:\n{stats}");
    assert_eq!(stat(&stats, "  of which failed to compile"), 1, "{stats}");
    // Its metrics count what --show-stats counts.
    let metrics = common::http::get(&daemon.metrics_addr(), "/metrics").1;
    let count = |name| common::http::sample(&metrics, name, &[]);
    assert_eq!(count("casbuild_cc_compile_requests_total"), 2.0, "{metrics}");
    assert_eq!(count("casbuild_cc_executed_remotely_total"), 2.0);
    assert_eq!(count("casbuild_cc_remote_compile_errors_total"), 1.0);
    assert!(count("casbuild_cc_uploaded_bytes_total") > 0.0);
}

#[test]
fn masquerade_links_reach_the_real_compiler_through_casbuild() {
    let dir = tempfile::tempdir().unwrap();
    let _daemons = Daemons { dir: dir.path().join("daemons"), remote: "grpc://127.0.0.1:1".into() };
    let links = dir.path().join("links");
    let out = common::casbuild().args(["cc", "--install-links"]).arg(&links).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    for name in ["gcc", "g++", "cc", "c++"] {
        assert!(links.join(name).exists(), "{name} link");
    }
    std::fs::write(dir.path().join("m.c"), "int m(void) { return 3; }\n").unwrap();
    let path = format!("{}:{}", links.display(), std::env::var("PATH").unwrap());
    // The cluster is unreachable, so the compile falls back, which shows
    // that it went through casbuild, and still produces the object with the
    // real gcc further along PATH (not the link itself, which would recurse).
    let out = Command::new("gcc")
        .args(["-c", "m.c", "-o", "m.o"])
        .current_dir(dir.path())
        .env("PATH", &path)
        .env("CASBUILD_REMOTE", "grpc://127.0.0.1:1")
        .env("CASBUILD_DAEMON_DIR", dir.path().join("daemons"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("casbuild cc: compiling m.c locally"), "{}", text(&out));
    assert!(dir.path().join("m.o").exists());
}

#[test]
fn a_daemon_directory_others_can_write_is_not_used() {
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::set_permissions(&shared, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    std::fs::write(dir.path().join("m.c"), "int m(void) { return 3; }\n").unwrap();
    let out = common::casbuild()
        .args(["cc", "gcc", "-c", "m.c", "-o", "m.o"])
        .current_dir(dir.path())
        .env("CASBUILD_REMOTE", "grpc://127.0.0.1:1")
        .env("CASBUILD_DAEMON_DIR", &shared)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("is not yours alone"), "{}", text(&out));
    assert!(dir.path().join("m.o").exists(), "compiled locally");
    assert_eq!(std::fs::read_dir(&shared).unwrap().count(), 0, "no socket or daemon went there");
}

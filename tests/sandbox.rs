//! The sandbox runner with real namespaces, overlays and processes: a
//! compile-like action, the command's view of the world, bad input, and
//! hostile commands that must not affect the host. Needs root.

mod common;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use casbuild_exec::sandbox::{RunReport, Sandbox, SandboxError, SandboxSpec};
use common::{needs_root, processes_with};

/// An input directory and a scratch directory under one temp dir.
struct Case {
    dir: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
}

impl Case {
    fn new(test: &str) -> Option<Case> {
        if !needs_root(test, false) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("in")).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        Some(Case { dir, runtime })
    }

    fn input(&self) -> PathBuf {
        self.dir.path().join("in")
    }

    fn write(&self, rel: &str, contents: &str) {
        let path = self.input().join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, contents).unwrap();
    }

    /// A spec running `argv` with a plain PATH and a 30 s timeout.
    fn spec(&self, argv: &[&str]) -> SandboxSpec {
        let mut spec = SandboxSpec::new(
            self.input(),
            self.dir.path().join("scratch"),
            argv.iter().map(|s| s.to_string()).collect(),
        );
        spec.env = vec![("PATH".into(), "/usr/bin:/bin".into())];
        spec.timeout_ms = Some(30_000);
        spec
    }

    fn try_run(&self, spec: &SandboxSpec) -> Result<RunReport, SandboxError> {
        let sandbox = Sandbox::new(env!("CARGO_BIN_EXE_casbuild"));
        self.runtime.block_on(sandbox.run(spec))
    }

    fn run(&self, spec: &SandboxSpec) -> (RunReport, String, String) {
        let report = self.try_run(spec).expect("the sandbox runs");
        let stdout = std::fs::read_to_string(Sandbox::stdout_path(spec)).unwrap_or_default();
        let stderr = std::fs::read_to_string(Sandbox::stderr_path(spec)).unwrap_or_default();
        (report, stdout, stderr)
    }

    fn sh(&self, script: &str) -> (RunReport, String, String) {
        self.run(&self.spec(&["sh", "-c", script]))
    }
}

fn no_mounts_under(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    !info.contains(path.to_str().unwrap())
}

#[test]
fn a_compile_action_builds_its_output_from_declared_inputs() {
    let Some(case) = Case::new("a_compile_action_builds_its_output_from_declared_inputs") else { return };
    case.write("src/main.c", "#include \"lib/answer.h\"\nint main(void) { return ANSWER - 42; }\n");
    case.write("include/lib/answer.h", "#define ANSWER 42\n");
    let mut spec = case.spec(&["cc", "-Iinclude", "-c", "src/main.c", "-o", "out/obj/main.o"]);
    spec.writable_dirs = vec!["out/obj".into()];
    let (report, _, stderr) = case.run(&spec);
    assert!(report.success(), "{report:?}: {stderr}");
    let object = Sandbox::upper_path(&spec).join("out/obj/main.o");
    let bytes = std::fs::read(&object).expect("the object file is in the upper layer");
    assert_eq!(&bytes[..4], b"\x7fELF");
    assert!(!case.input().join("out").exists(), "the input directory is untouched");
    assert!(no_mounts_under(case.dir.path()), "nothing stays mounted on the host");
}

#[test]
fn the_command_sees_only_its_sandbox() {
    let Some(case) = Case::new("the_command_sees_only_its_sandbox") else { return };
    case.write("data.txt", "declared\n");
    let script = "echo pid=$$; id -u; id -g; hostname; id -un; id -gn; env | sort; pwd; cat data.txt; ls /";
    let mut spec = case.spec(&["sh", "-c", script]);
    spec.env.push(("ONLY_THIS".into(), "1".into()));
    spec.uid = 61001;
    spec.gid = 61001;
    let (report, stdout, stderr) = case.run(&spec);
    assert!(report.success(), "{report:?}: {stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "pid=2", "the command is the first child of the sandbox's init");
    assert_eq!(lines[1..3], ["61001", "61001"]);
    assert_eq!(lines[3], "casbuild");
    assert_eq!(lines[4..6], ["casbuild", "casbuild"], "the user and group have names in /etc/passwd and /etc/group");
    // `env` shows exactly the declared variables (sh adds PWD and SHLVL of its own).
    let env: Vec<&str> = lines.iter().copied().filter(|l| l.contains('=') && !l.starts_with("pid=")).collect();
    assert!(env.contains(&"ONLY_THIS=1") && env.contains(&"PATH=/usr/bin:/bin"), "{env:?}");
    assert!(!env.iter().any(|l| l.starts_with("HOME=") || l.starts_with("USER=")), "nothing inherited: {env:?}");
    assert!(lines.contains(&"/work") && lines.contains(&"declared"));
    let root: Vec<&str> = lines.iter().rev().take_while(|l| !l.contains('=') && **l != "declared").copied().collect();
    for absent in ["root", "home", "var", "srv"] {
        assert!(!root.contains(&absent), "/{absent} is not visible: {root:?}");
    }
}

#[test]
fn bad_commands_get_a_clear_error() {
    let Some(case) = Case::new("bad_commands_get_a_clear_error") else { return };
    case.write("script.sh", "#!/bin/sh\necho hi\n");
    let (report, _, _) = case.run(&case.spec(&["no-such-tool", "x"]));
    assert!(report.error.as_deref().unwrap_or("").contains("command not found"), "{report:?}");
    let (report, _, _) = case.run(&case.spec(&["./script.sh"]));
    assert!(report.error.as_deref().unwrap_or("").contains("permission denied"), "{report:?}");

    let mut spec = case.spec(&[]);
    assert!(matches!(case.try_run(&spec), Err(SandboxError::Invalid(m)) if m.0.contains("no arguments")));
    spec = case.spec(&["true"]);
    spec.cwd = "../..".into();
    assert!(matches!(case.try_run(&spec), Err(SandboxError::Invalid(m)) if m.0.contains("working directory")));
    spec = case.spec(&["true"]);
    spec.writable_dirs = vec!["/etc".into()];
    assert!(matches!(case.try_run(&spec), Err(SandboxError::Invalid(m)) if m.0.contains("output directory")));
    assert!(no_mounts_under(case.dir.path()));
}

#[test]
fn host_files_and_escapes_are_out_of_reach() {
    let Some(case) = Case::new("host_files_and_escapes_are_out_of_reach") else { return };
    let secret = case.dir.path().join("secret.txt");
    std::fs::write(&secret, "host secret").unwrap();
    std::os::unix::fs::symlink(&secret, case.input().join("leak")).unwrap();
    let script = format!(
        "cat {s}; cat leak; cat ../../../../{s}; cat /etc/shadow; ls /root; \
         echo x > /usr/evil; echo x > /evil; echo x > /etc/evil; echo ok > /tmp/t && cat /tmp/t",
        s = secret.display()
    );
    let (report, stdout, stderr) = case.sh(&script);
    assert_eq!(report.exit_code, Some(0), "{report:?}: {stderr}");
    assert!(!stdout.contains("host secret"), "{stdout}");
    assert_eq!(stdout.trim(), "ok", "only the private /tmp is writable outside the tree");
    for denied in ["/usr/evil", "/evil", "/etc/evil"] {
        assert!(!Path::new(denied).exists());
    }
    assert!(stderr.contains("Read-only file system") || stderr.contains("Permission denied"), "{stderr}");
}

#[test]
fn the_network_is_isolated() {
    let Some(case) = Case::new("the_network_is_isolated") else { return };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let (report, stdout, _) =
        case.run(&case.spec(&["bash", "-c", &format!("exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected")]));
    assert_ne!(report.exit_code, Some(0));
    assert!(!stdout.contains("connected"));
    assert_eq!(listener.accept().unwrap_err().kind(), std::io::ErrorKind::WouldBlock, "nothing reached the host");
}

#[test]
fn daemons_die_with_the_action_and_timeouts_kill_everything() {
    let Some(case) = Case::new("daemons_die_with_the_action_and_timeouts_kill_everything") else { return };
    let (report, _, _) = case.sh("sleep 4242 & sleep 4243 & echo started");
    assert!(report.success(), "{report:?}");
    std::thread::sleep(Duration::from_millis(100));
    assert!(processes_with("sleep 424").is_empty(), "background processes were killed");

    let mut spec = case.spec(&["sh", "-c", "sleep 4244 & sleep 4245"]);
    spec.timeout_ms = Some(500);
    let (report, _, _) = case.run(&spec);
    assert!(report.timed_out && report.exit_code.is_none(), "{report:?}");
    assert!(report.wall_micros < 10_000_000, "killed soon after the timeout: {report:?}");
    std::thread::sleep(Duration::from_millis(100));
    assert!(processes_with("sleep 424").is_empty(), "everything in the sandbox was killed");
    assert!(no_mounts_under(case.dir.path()));
}

#[test]
fn the_cpu_time_of_every_process_of_the_action_is_reported() {
    let Some(case) = Case::new("the_cpu_time_of_every_process_of_the_action_is_reported") else { return };
    // Two busy shells, one of them orphaned (its parent exits first).
    let busy = "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done";
    let (report, _, stderr) = case.sh(&format!("sh -c '({busy}) & exit 0'; {busy}; wait"));
    assert!(report.success(), "{report:?}: {stderr}");
    let cpu = report.cpu_micros.expect("cpu time is reported");
    assert!(cpu >= 40_000, "two busy loops took CPU time: {report:?}");
}

#[test]
fn a_fork_bomb_and_a_flood_of_output_are_contained() {
    let Some(case) = Case::new("a_fork_bomb_and_a_flood_of_output_are_contained") else { return };
    let mut spec = case.spec(&["sh", "-c", "bomb() { bomb | bomb & }; bomb; sleep 2"]);
    spec.uid = 61002;
    spec.gid = 61002;
    spec.limits.max_processes = 64;
    spec.timeout_ms = Some(5_000);
    let (report, _, _) = case.run(&spec);
    assert!(report.error.is_none(), "{report:?}");
    std::thread::sleep(Duration::from_millis(200));
    let left = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.metadata().map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 61002).unwrap_or(false))
        .count();
    assert_eq!(left, 0, "no process of the bomb survives");

    let mut spec = case.spec(&["yes", "flood"]);
    spec.limits.max_file_bytes = 1 << 20;
    let (report, _, _) = case.run(&spec);
    assert_eq!(report.signal, Some(libc::SIGXFSZ), "{report:?}");
    let mut stdout = Vec::new();
    std::fs::File::open(Sandbox::stdout_path(&spec)).unwrap().read_to_end(&mut stdout).unwrap();
    assert!(stdout.len() <= 1 << 20, "stdout is capped at the file size limit ({} bytes)", stdout.len());
}

#[test]
fn outputs_keep_their_kinds_and_bits() {
    let Some(case) = Case::new("outputs_keep_their_kinds_and_bits") else { return };
    let mut spec = case.spec(&[
        "sh",
        "-c",
        "printf x > out/file && printf '#!/bin/sh\\n' > out/tool && chmod 755 out/tool \
         && mkdir -p out/dir/sub && printf y > out/dir/sub/f && ln -s file out/link",
    ]);
    spec.writable_dirs = vec!["out".into()];
    let (report, _, stderr) = case.run(&spec);
    assert!(report.success(), "{report:?}: {stderr}");
    let upper = Sandbox::upper_path(&spec).join("out");
    assert_eq!(std::fs::read(upper.join("file")).unwrap(), b"x");
    assert_eq!(std::fs::metadata(upper.join("tool")).unwrap().permissions().mode() & 0o111, 0o111);
    assert_eq!(std::fs::read(upper.join("dir/sub/f")).unwrap(), b"y");
    assert_eq!(std::fs::read_link(upper.join("link")).unwrap(), Path::new("file"));
}

/// Runs under way together never share a network namespace, and a run
/// never meets what an earlier one left there: an abstract Unix socket
/// (named within the network namespace, reachable although loopback is
/// down) bound by one run is out of reach of every other.
#[test]
fn runs_never_meet_in_a_network_namespace() {
    let Some(case) = Case::new("runs_never_meet_in_a_network_namespace") else { return };
    let sandbox = Sandbox::new(env!("CARGO_BIN_EXE_casbuild"));
    let bind = "s=socket.socket(socket.AF_UNIX)\ns.bind('\\0casbuild-ns-test')\ns.listen()\n";
    let probe = "for _ in range(30):\n    c=socket.socket(socket.AF_UNIX)\n    try:\n        \
                 c.connect('\\0casbuild-ns-test')\n        print('reached')\n        break\n    \
                 except OSError:\n        time.sleep(0.05)\nelse:\n    print('alone')\n";
    let python = |name: &str, script: String| {
        let mut spec = case.spec(&["python3", "-c", &format!("import os,socket,time\n{script}")]);
        spec.scratch = case.dir.path().join(name);
        spec
    };
    let run = |spec: &SandboxSpec| {
        let report = case.runtime.block_on(sandbox.run(spec)).expect("the sandbox runs");
        assert!(report.success(), "{report:?}: {}", std::fs::read_to_string(Sandbox::stderr_path(spec)).unwrap());
        std::fs::read_to_string(Sandbox::stdout_path(spec)).unwrap()
    };

    // The probe can tell: within one run it reaches its own socket.
    assert_eq!(run(&python("itself", format!("{bind}{probe}"))), "reached\n");

    // Two runs at once: one listens for 2 s while the other probes.
    let listener = python("listener", format!("{bind}time.sleep(2)\n"));
    let prober = python("prober", probe.to_owned());
    let (listened, probed) =
        case.runtime.block_on(async { tokio::join!(sandbox.run(&listener), sandbox.run(&prober)) });
    assert!(listened.unwrap().success());
    assert!(probed.unwrap().success());
    assert_eq!(std::fs::read_to_string(Sandbox::stdout_path(&prober)).unwrap(), "alone\n");

    // A run leaves a listening daemon behind; the runs after it (which get
    // its namespace again) find nothing.
    let daemon = format!("if os.fork() == 0:\n    {}time.sleep(30)\ntime.sleep(0.3)\n", bind.replace('\n', "\n    "));
    run(&python("daemon", daemon));
    for i in 0..3 {
        assert_eq!(run(&python(&format!("after-{i}"), probe.to_owned())), "alone\n");
    }
}

/// The seccomp filter as the kernel applies it to the command: denied calls
/// fail with EPERM, unavailable ones with ENOSYS (so libraries fall back),
/// the x32 ABI is unavailable, everything else works.
#[cfg(target_arch = "x86_64")]
#[test]
fn the_seccomp_filter_answers_the_command_as_listed() {
    let Some(case) = Case::new("the_seccomp_filter_answers_the_command_as_listed") else { return };
    let script = "import ctypes\n\
                  libc = ctypes.CDLL(None, use_errno=True)\n\
                  for name, nr in [('mount', 165), ('bpf', 321), ('clone3', 435), ('getpid', 39), ('x32 getpid', 0x40000027)]:\n    \
                  ctypes.set_errno(0)\n    \
                  r = libc.syscall(nr, 0, 0, 0, 0, 0)\n    \
                  print(name, r if r >= 0 else 'errno %d' % ctypes.get_errno())\n";
    let (report, stdout, stderr) = case.run(&case.spec(&["python3", "-c", script]));
    assert!(report.success(), "{report:?}: {stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], format!("mount errno {}", libc::EPERM));
    assert_eq!(lines[1], format!("bpf errno {}", libc::EPERM));
    assert_eq!(lines[2], format!("clone3 errno {}", libc::ENOSYS));
    assert_eq!(lines[3], "getpid 2", "the command is pid 2 of its sandbox");
    assert_eq!(lines[4], format!("x32 getpid errno {}", libc::ENOSYS));
}

//! Hostile actions against `casbuild up`, sent the way an attacker would:
//! a client that may call Execute, with an input root and a command built to
//! reach the host. Each test runs the real attack through the real worker,
//! sandbox and mount, and asserts the host is untouched and the action got
//! nothing it may not have. Needs root (FUSE, namespaces).

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use casbuild_cas::digest::Digest;
use casbuild_proto::reapi::command::EnvironmentVariable;
use casbuild_proto::reapi::execution_client::ExecutionClient;
use casbuild_proto::reapi::{
    Action, BatchReadBlobsRequest, Command, Directory, ExecuteResponse, FileNode, SymlinkNode,
};
use common::execute::{blob, execute, execute_request, upload, F};
use common::{needs_root, Coordinator};

/// `casbuild up` in a temp directory, and a runtime to talk to it.
struct Farm {
    dir: tempfile::TempDir,
    server: Coordinator,
    runtime: tokio::runtime::Runtime,
}

/// What an attack asks for: a shell script, an input root, outputs.
#[derive(Default)]
struct Attack<'a> {
    script: &'a str,
    /// Symlinks at the top of the input root: (name, target).
    links: &'a [(&'a str, &'a str)],
    /// Files at the top of the input root: (name, contents).
    files: &'a [(&'a str, &'a str)],
    outputs: &'a [&'a str],
    working_directory: &'a str,
    timeout: Option<Duration>,
}

impl Farm {
    fn start(test: &str) -> Option<Farm> {
        Farm::start_with(test, &[])
    }

    /// `casbuild up` with extra flags. Tests that load a host get a uid
    /// range of their own (`--sandbox-uids`), as separate workers would.
    fn start_with(test: &str, extra: &[&str]) -> Option<Farm> {
        if !needs_root(test, true) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let server = Coordinator::start_up_with(&dir.path().join("up"), extra);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        Some(Farm { dir, server, runtime })
    }

    /// A host directory holding a root-only secret: what attacks try to reach.
    fn host_secret(&self) -> (std::path::PathBuf, std::path::PathBuf) {
        let host = self.dir.path().join("host");
        std::fs::create_dir_all(&host).unwrap();
        std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o700)).unwrap();
        let secret = host.join("secret");
        std::fs::write(&secret, "host secret\n").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        (host, secret)
    }

    fn run(&self, attack: &Attack) -> ExecuteResponse {
        self.runtime.block_on(self.submit(attack))
    }

    /// Uploads and executes `attack`, returning the final response.
    async fn submit(&self, attack: &Attack<'_>) -> ExecuteResponse {
        let mut root = Directory::default();
        let mut blobs: Vec<(Digest, Bytes)> = Vec::new();
        for (name, contents) in attack.files {
            let data = Bytes::from(contents.to_string());
            let digest = F.digest_of(&data);
            root.files.push(FileNode { name: name.to_string(), digest: Some(digest.to_proto()), ..Default::default() });
            blobs.push((digest, data));
        }
        for (name, target) in attack.links {
            let (name, target) = (name.to_string(), target.to_string());
            root.symlinks.push(SymlinkNode { name, target, node_properties: None });
        }
        let command = Command {
            arguments: vec!["sh".into(), "-c".into(), attack.script.into()],
            environment_variables: vec![EnvironmentVariable { name: "PATH".into(), value: "/usr/bin:/bin".into() }],
            output_paths: attack.outputs.iter().map(|s| s.to_string()).collect(),
            working_directory: attack.working_directory.into(),
            ..Default::default()
        };
        let (command_digest, command_bytes) = blob(&command);
        let (root_digest, root_bytes) = blob(&root);
        let timeout =
            attack.timeout.map(|t| casbuild_proto::protobuf::Duration { seconds: t.as_secs() as i64, nanos: 0 });
        let action = Action {
            command_digest: Some(command_digest.to_proto()),
            input_root_digest: Some(root_digest.to_proto()),
            do_not_cache: true,
            timeout,
            ..Default::default()
        };
        let (action_digest, action_bytes) = blob(&action);
        blobs.extend([(command_digest, command_bytes), (root_digest, root_bytes), (action_digest, action_bytes)]);
        upload(&self.server, blobs).await;
        let mut client = ExecutionClient::new(self.server.channel().await);
        execute(&mut client, execute_request(&action_digest, true)).await
    }

    /// The stderr of a response's result.
    fn stderr(&self, response: &ExecuteResponse) -> String {
        let digest = response.result.as_ref().and_then(|r| r.stderr_digest.clone()).expect("a stderr digest");
        self.runtime.block_on(async {
            let read = BatchReadBlobsRequest {
                digests: vec![digest],
                digest_function: F.to_proto() as i32,
                ..Default::default()
            };
            let mut response = self.server.cas().await.batch_read_blobs(read).await.unwrap().into_inner();
            String::from_utf8_lossy(&response.responses.remove(0).data).into_owned()
        })
    }
}

fn exit_code(response: &ExecuteResponse) -> i32 {
    response.result.as_ref().map_or(-1, |r| r.exit_code)
}

/// What the response says: its status's message and its own message.
fn status_message(response: &ExecuteResponse) -> String {
    let status = response.status.as_ref().map(|s| s.message.clone()).unwrap_or_default();
    format!("{status}\n{}", response.message)
}

/// No output file or directory came back, whatever else did.
fn no_files_or_directories(response: &ExecuteResponse) -> bool {
    response.result.as_ref().is_none_or(|r| r.output_files.is_empty() && r.output_directories.is_empty())
}

#[test]
fn outputs_behind_planted_links_never_reach_host_files() {
    let Some(farm) = Farm::start("outputs_behind_planted_links_never_reach_host_files") else { return };
    let (host, secret) = farm.host_secret();
    let (host, secret) = (host.to_str().unwrap(), secret.to_str().unwrap());

    // A working-tree directory replaced by an absolute link; a file declared through it.
    // (The worker made `d` for the declared output; the command swaps it.)
    let script = format!("rmdir d && ln -s {host} d");
    let response = farm.run(&Attack { script: &script, outputs: &["d/secret"], ..Default::default() });
    assert!(no_files_or_directories(&response), "{response:?}");
    assert!(status_message(&response).contains("symbolic link"), "{}", status_message(&response));

    // The same link declared as an output directory comes back as a link.
    let response = farm.run(&Attack { script: &format!("ln -s {host} d"), outputs: &["d"], ..Default::default() });
    assert!(no_files_or_directories(&response), "{response:?}");
    let links = &response.result.as_ref().unwrap().output_symlinks;
    assert_eq!(links.len(), 1);
    assert_eq!(links[0].target, host);

    // A relative link several levels deep, climbing out of the tree.
    // (The worker's directories for the output are root's: the command moves them away.)
    let script = "mv a a.old && mkdir -p a/b && ln -s ../../../../../../../../../../.. a/b/up";
    let declared = format!("a/b/up{secret}");
    let response = farm.run(&Attack { script, outputs: &[declared.as_str()], ..Default::default() });
    assert!(no_files_or_directories(&response), "{response:?}");
    assert!(status_message(&response).contains("symbolic link"), "{}", status_message(&response));

    // The working directory itself swapped for a link after the set-up.
    let script = format!("cd .. && rmdir pkg && ln -s {host} pkg");
    let response =
        farm.run(&Attack { script: &script, outputs: &["secret"], working_directory: "pkg", ..Default::default() });
    assert!(no_files_or_directories(&response), "{response:?}");
    assert!(status_message(&response).contains("symbolic link"), "{}", status_message(&response));

    // A file output that is a link to a host secret is returned as that link.
    let response =
        farm.run(&Attack { script: &format!("ln -s {secret} out"), outputs: &["out"], ..Default::default() });
    assert!(no_files_or_directories(&response), "{response:?}");
    assert_eq!(response.result.unwrap().output_symlinks[0].target, secret);
}

#[test]
fn set_up_never_creates_or_chowns_through_input_root_links() {
    let Some(farm) = Farm::start("set_up_never_creates_or_chowns_through_input_root_links") else { return };
    let (host, _) = farm.host_secret();
    let before = std::fs::metadata(&host).unwrap();
    let target = host.to_str().unwrap();
    let unchanged = |what: &str| {
        let after = std::fs::metadata(&host).unwrap();
        assert_eq!((after.uid(), after.gid(), after.mode()), (before.uid(), before.gid(), before.mode()), "{what}");
        let entries: Vec<_> = std::fs::read_dir(&host).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(entries, ["secret"], "{what}: nothing is created in the host directory");
    };

    // An output's parent is a link to a host directory (relative and absolute link).
    for link in [target.to_owned(), format!("../../../../../../../../../..{target}")] {
        let response = farm.run(&Attack {
            script: "true",
            links: &[("out", &link)],
            outputs: &["out/x/y.o"],
            ..Default::default()
        });
        unchanged(&format!("output parent through {link}"));
        assert!(status_message(&response).contains("not a link"), "{}", status_message(&response));
    }
    // The working directory goes through such a link.
    let response = farm.run(&Attack {
        script: "touch made-here",
        links: &[("wd", target)],
        working_directory: "wd/sub",
        ..Default::default()
    });
    unchanged("working directory through a link");
    assert!(status_message(&response).contains("working directory"), "{}", status_message(&response));
    assert!(!Path::new(target).join("sub").exists());
}

#[test]
fn a_process_hog_does_not_starve_another_action_on_the_same_worker() {
    let flags = ["--sandbox-uids", "2991000-2991007", "--slots", "2"];
    let Some(farm) = Farm::start_with("a_process_hog_does_not_starve_another_action", &flags) else { return };
    let hog = "i=0; while [ $i -lt 700 ]; do sleep 20 & i=$((i+1)); done 2>/dev/null; sleep 1";
    let normal = "for i in 1 2 3 4 5 6 7 8 9 10; do (true) && /bin/true; done; echo fine > out";
    let (hogged, ran) = farm.runtime.block_on(async {
        let hog_attack = Attack { script: hog, ..Default::default() };
        let hog = farm.submit(&hog_attack);
        let normal = async {
            // Start once the hog holds its processes.
            tokio::time::sleep(Duration::from_millis(700)).await;
            farm.submit(&Attack { script: normal, outputs: &["out"], ..Default::default() }).await
        };
        tokio::join!(hog, normal)
    });
    assert_eq!(exit_code(&ran), 0, "{ran:?}\n{}", farm.stderr(&ran));
    assert_eq!(ran.result.as_ref().unwrap().output_files.len(), 1);
    assert_ne!(exit_code(&hogged), 0);
    assert!(hogged.message.contains("reached its limit of 512 processes"), "{}", hogged.message);
}

#[test]
fn memory_scratch_and_time_are_bounded_with_clear_messages() {
    let flags = [
        "--sandbox-uids",
        "2991100-2991103",
        "--max-memory",
        "64MiB",
        "--max-scratch-size",
        "16MiB",
        "--default-timeout",
        "2s",
        "--max-timeout",
        "1h",
    ];
    let Some(farm) = Farm::start_with("memory_scratch_and_time_are_bounded", &flags) else { return };

    // 200 MB held by the shell: over the 64 MiB limit, killed by the kernel.
    let hog = "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo ${#x}";
    let response = farm.run(&Attack { script: hog, ..Default::default() });
    assert_ne!(exit_code(&response), 0);
    assert!(response.message.contains("exceeded its 64 MiB memory limit"), "{}", response.message);

    // /tmp, /dev/shm and the working tree share the 16 MiB scratch budget.
    for target in ["/tmp/big", "/dev/shm/big", "big"] {
        let script = format!("head -c 50000000 /dev/zero > {target}");
        let response = farm.run(&Attack { script: &script, ..Default::default() });
        assert_ne!(exit_code(&response), 0, "{target}");
        assert!(response.message.contains("filled its 16 MiB of scratch space"), "{target}: {}", response.message);
        // Run after the hog by the same sandbox user, so in its warm slot
        // and cgroup: the hog's OOM kill is not counted again.
        assert!(!response.message.contains("memory limit"), "{target}: {}", response.message);
    }
    let small = "head -c 4000000 /dev/zero > /tmp/small && echo ok > out";
    let response = farm.run(&Attack { script: small, outputs: &["out"], ..Default::default() });
    assert_eq!(exit_code(&response), 0, "within the budget all is well");

    // No timeout given: the worker's default (2 s) applies.
    let response = farm.run(&Attack { script: "sleep 30", ..Default::default() });
    assert!(response.message.contains("timed out"), "{}", response.message);
    // A timeout beyond the maximum is refused, not silently shortened.
    let long = Some(Duration::from_secs(3 * 3600));
    let response = farm.run(&Attack { script: "true", timeout: long, ..Default::default() });
    let status = response.status.clone().unwrap_or_default();
    assert_eq!(status.code, tonic::Code::InvalidArgument as i32, "{response:?}");
    assert!(status.message.contains("maximum of 3600 s"), "{}", status.message);
}

#[test]
fn denied_system_calls_fail_inside_the_sandbox() {
    let Some(farm) = Farm::start("denied_system_calls_fail_inside_the_sandbox") else { return };
    for (script, what) in [("unshare -U true", "a new user namespace"), ("unshare -r true", "a user namespace as root")]
    {
        let response = farm.run(&Attack { script, ..Default::default() });
        let stderr = farm.stderr(&response);
        assert_ne!(exit_code(&response), 0, "{what}: {stderr}");
        assert!(stderr.contains("Operation not permitted"), "{what}: {stderr}");
    }

    // A connection out is refused in the sandbox and named in the report
    // (a documentation-only address: nothing leaves the empty namespace).
    let script = "bash -c 'exec 3<>/dev/tcp/127.0.0.1/9'; bash -c 'exec 3<>/dev/tcp/192.0.2.1/443'";
    let response = farm.run(&Attack { script, ..Default::default() });
    assert_ne!(exit_code(&response), 0);
    assert!(response.message.contains("network: connect 192.0.2.1:443 denied"), "{}", response.message);
    assert!(!response.message.contains("127.0.0.1"), "loopback is not reported: {}", response.message);
    assert!(farm.stderr(&response).contains("casbuild: network: connect 192.0.2.1:443 denied"));
}

#[test]
fn other_local_users_cannot_read_inputs_through_the_mount() {
    let Some(farm) = Farm::start("other_local_users_cannot_read_inputs_through_the_mount") else { return };
    // Let anyone walk to the mount, so that only the mount's own permissions decide.
    for dir in [farm.dir.path().to_path_buf(), farm.dir.path().join("up")] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let secret = "the input of someone else's action\n";
    let digest = F.digest_of(secret.as_bytes());
    let blobs = farm.dir.path().join("up/cas/blobs").join(F.name());
    let blob_path = blobs.join(format!("{}-{}", digest.hash_hex(), digest.size_bytes));
    let as_nobody = |path: &Path| {
        std::process::Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups", "cat"])
            .arg(path)
            .output()
            .unwrap()
    };
    // The action reads its input (the sandbox user may) and lives long enough to be spied on.
    let (response, spied) = farm.runtime.block_on(async {
        let files = [("input", secret)];
        let attack =
            Attack { script: "cat input > out; sleep 2", files: &files, outputs: &["out"], ..Default::default() };
        let action = farm.submit(&attack);
        let spy = async {
            tokio::time::sleep(Duration::from_millis(800)).await;
            let inputs = farm.dir.path().join("up/cas/inputs");
            [as_nobody(&inputs), as_nobody(&blob_path)]
        };
        tokio::join!(action, spy)
    });
    assert_eq!(exit_code(&response), 0, "the action itself reads its input: {response:?}");
    for output in &spied {
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("Permission denied"), "{stderr}");
    }
    assert_eq!(std::fs::read(&blob_path).unwrap(), secret.as_bytes(), "root still reads the mount");
}

#[test]
fn a_foreign_scratch_directory_is_refused_and_left_alone() {
    if !needs_root("a_foreign_scratch_directory_is_refused_and_left_alone", true) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("up");
    std::fs::create_dir_all(up.join("scratch/src")).unwrap();
    std::fs::write(up.join("scratch/src/main.c"), "int main(void) { return 0; }\n").unwrap();
    let output = common::casbuild()
        .args(["up", "--listen", "127.0.0.1:0", "--dir", up.to_str().unwrap()])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not empty and was not made by casbuild"), "{stderr}");
    assert!(up.join("scratch/src/main.c").exists(), "nothing of the directory was deleted");

    // `casbuild worker --scratch` refuses it before it connects or mounts anything.
    let scratch = up.join("scratch");
    let output = common::casbuild()
        .args(["worker", "--coordinator", "grpc://127.0.0.1:1", "--scratch", scratch.to_str().unwrap()])
        .args(["--mount", up.join("cas-never").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not empty and was not made by casbuild"), "{stderr}");
    assert!(scratch.join("src/main.c").exists());
}

/// The file named `name` somewhere under `dir`.
fn find_file(dir: &Path, name: &str) -> Option<std::path::PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_file(&path, name) {
                return Some(found);
            }
        } else if entry.file_name() == name {
            return Some(path);
        }
    }
    None
}

#[test]
fn a_corrupted_worker_cache_blob_is_refetched_after_a_restart() {
    // A worker of its own (`casbuild up`'s worker has no cache: it reads the
    // coordinator's store).
    if !needs_root("a_corrupted_worker_cache_blob_is_refetched_after_a_restart", true) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(&dir.path().join("store"), &[]);
    let worker = common::start_worker(&server, dir.path(), 1, &[]);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let farm = Farm { dir, server, runtime };
    // Large enough to be streamed into the worker's disk cache.
    let input: String = (0..20_000).map(|i| format!("{i:05}\n")).collect();
    let digest = F.digest_of(input.as_bytes());
    let files = [("input", input.as_str())];
    let attack = Attack { script: "cat input > out", files: &files, outputs: &["out"], ..Default::default() };
    let first = farm.run(&attack);
    assert_eq!(exit_code(&first), 0, "{first:?}");

    // The worker stops; its cached copy decays on disk (same length, one bit).
    worker.stop();
    let name = format!("{}-{}", digest.hash_hex(), digest.size_bytes);
    let cached = find_file(&farm.dir.path().join("worker-1/cache"), &name).expect("the worker cached the input");
    let mut bytes = std::fs::read(&cached).unwrap();
    bytes[1000] ^= 0x20;
    std::fs::write(&cached, &bytes).unwrap();

    let _worker = common::start_worker(&farm.server, farm.dir.path(), 1, &[]);
    let again = farm.run(&attack);
    assert_eq!(exit_code(&again), 0, "{again:?}");
    let out = again.result.unwrap().output_files[0].digest.clone().unwrap();
    assert_eq!(out.hash, digest.hash_hex(), "the action read the input's true bytes, refetched");
    let cached_now = std::fs::read(&cached).unwrap_or_default();
    assert_eq!(cached_now, input.as_bytes(), "the cache holds the good copy again");
}

/// The outputs of a response, by path.
fn output_text(farm: &Farm, response: &ExecuteResponse, path: &str) -> String {
    let result = response.result.as_ref().expect("a result");
    let file = result.output_files.iter().find(|f| f.path == path).unwrap_or_else(|| panic!("no output {path}"));
    let digest = file.digest.clone().expect("a digest");
    farm.runtime.block_on(async {
        let read =
            BatchReadBlobsRequest { digests: vec![digest], digest_function: F.to_proto() as i32, ..Default::default() };
        let mut response = farm.server.cas().await.batch_read_blobs(read).await.unwrap().into_inner();
        String::from_utf8_lossy(&response.responses.remove(0).data).into_owned()
    })
}

#[test]
fn nothing_an_action_leaves_behind_reaches_the_next_action_in_its_warm_slot() {
    // One sandbox user: every action runs in the same warm slot.
    let flags = ["--sandbox-uids", "2991300-2991300", "--slots", "1"];
    let Some(farm) = Farm::start_with("nothing_an_action_leaves_behind_reaches_the_next", &flags) else { return };
    // A slot is known by its init: the mount namespace and pid 1's start
    // time (namespace numbers alone may be reused once one is freed).
    let leave = "(readlink /proc/self/ns/mnt; cut -d' ' -f22 /proc/1/stat) > slot; wc -l < /proc/self/mountinfo > table; \
                 setsid sleep 600 & nohup sleep 600 >/dev/null 2>&1 & \
                 echo left > /tmp/left; echo left > /dev/shm/left; \
                 ipcmk -M 4096 >/dev/null && ipcmk -Q >/dev/null && ipcs | grep -c '^0x' > ipcs; \
                 mkdir -p sub; if mount -t tmpfs t sub 2>/dev/null; then echo mounted > mount; else echo refused > mount; fi";
    let outputs = ["slot", "table", "ipcs", "mount"];
    let first = farm.run(&Attack { script: leave, outputs: &outputs, ..Default::default() });
    assert_eq!(exit_code(&first), 0, "{first:?}\n{}", farm.stderr(&first));
    assert_eq!(output_text(&farm, &first, "ipcs"), "2\n", "the first action made its IPC objects");
    assert_eq!(output_text(&farm, &first, "mount"), "refused\n");

    let look =
        "(readlink /proc/self/ns/mnt; cut -d' ' -f22 /proc/1/stat) > slot; wc -l < /proc/self/mountinfo > table; \
                (cat /proc/[0-9]*/comm | grep -c '^sleep$' || true) > sleepers; \
                ls -A /tmp /dev/shm > files; (ipcs | grep -c '^0x' || true) > ipcs; \
                (grep -c ' /work/sub ' /proc/self/mountinfo || true) > mounts";
    let outputs = ["slot", "table", "sleepers", "files", "ipcs", "mounts"];
    let second = farm.run(&Attack { script: look, outputs: &outputs, ..Default::default() });
    assert_eq!(exit_code(&second), 0, "{second:?}\n{}", farm.stderr(&second));
    assert_eq!(output_text(&farm, &first, "slot"), output_text(&farm, &second, "slot"), "the slot was reused");
    assert_eq!(output_text(&farm, &second, "sleepers"), "0\n", "no process of the first action is left");
    assert_eq!(output_text(&farm, &second, "files"), "/dev/shm:\n\n/tmp:\n", "a new /tmp and /dev/shm");
    assert_eq!(output_text(&farm, &second, "ipcs"), "0\n", "no SysV object of the first action");
    assert_eq!(output_text(&farm, &second, "mounts"), "0\n");
    // The first action's working tree, /tmp and /dev/shm were unmounted
    // before the second started (none stacked under the second's).
    assert_eq!(output_text(&farm, &first, "table"), output_text(&farm, &second, "table"), "as many mounts as before");

    // A slot whose action timed out is thrown away: the next action of its
    // user runs, in a new sandbox.
    let hang = Attack { script: "sleep 600", timeout: Some(Duration::from_secs(1)), ..Default::default() };
    let hung = farm.run(&hang);
    assert!(status_message(&hung).contains("timed out"), "{}", status_message(&hung));
    let script = "(readlink /proc/self/ns/mnt; cut -d' ' -f22 /proc/1/stat) > slot";
    let after = farm.run(&Attack { script, outputs: &["slot"], ..Default::default() });
    assert_eq!(exit_code(&after), 0, "{after:?}\n{}", farm.stderr(&after));
    assert_ne!(
        output_text(&farm, &after, "slot"),
        output_text(&farm, &second, "slot"),
        "a new slot after the time-out"
    );
}

#[test]
fn a_warm_slot_names_every_host_path_each_of_its_actions_looked_for() {
    let flags = ["--sandbox-uids", "2991400-2991400", "--slots", "1"];
    let Some(farm) = Farm::start_with("a_warm_slot_names_every_host_path", &flags) else { return };
    let script = "echo $(readlink /proc/self/ns/mnt; cut -d' ' -f22 /proc/1/stat) >&2; cat /home/alice/secret";
    let attack = Attack { script, ..Default::default() };
    let mut namespaces = Vec::new();
    for _ in 0..2 {
        let response = farm.run(&attack);
        assert_eq!(exit_code(&response), 1);
        let stderr = farm.stderr(&response);
        assert!(stderr.contains("undeclared input: /home (lookup: not found)"), "every run names it: {stderr}");
        namespaces.push(stderr.lines().next().unwrap_or_default().to_owned());
    }
    // The misses of the first run did not stay cached in the slot's root.
    assert_eq!(namespaces[0], namespaces[1], "both ran in one slot");
}

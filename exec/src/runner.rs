//! One REAPI action, start to finish, on this host: fetch the Action and
//! Command, register the input root on the /cas mount, run the command in the
//! sandbox over it, collect and upload outputs, and build the ActionResult —
//! with a hermeticity report when the action fails.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use casbuild_cas::digest::{Digest, DigestFunction};
use casbuild_cas::local_tree::hash_file;
use casbuild_cas::store::{upload_missing, BlobStore, CasInstances, StoreError};
use casbuild_cas::tree::child_digest;
use casbuild_mount::{AccessReport, CasMount, Prefetch, PrefetchLimits};
use casbuild_proto::reapi::{Action, ActionResult, Command, ExecutedActionMetadata};
use prost::Message;

use crate::cgroup::Cgroups;
use crate::outputs::{collect, output_parents};
use crate::profiles::{AccessProfiles, ProfileKey};
use crate::sandbox::{Limits, RunReport, Sandbox, SandboxSpec, DEFAULT_TOOLCHAIN, DEFAULT_WORK_DIR};

/// Most undeclared paths listed in one hermeticity report.
const REPORT_LINES: usize = 20;

/// The user ids sandboxed commands run as unless configured: a range no
/// distribution hands out to people or services (the group is the first).
pub const DEFAULT_UIDS: (u32, u32) = (2_990_000, 2_990_255);

/// How this host runs actions.
#[derive(Clone, Debug)]
pub struct RunnerConfig {
    /// Per-action scratch directories live here; leftovers are removed at
    /// start (only from a directory casbuild made, see [`crate::scratch`]).
    pub scratch_root: PathBuf,
    /// The `casbuild` binary that serves as the sandbox helper.
    pub helper: PathBuf,
    /// Host paths visible read-only in the sandbox.
    pub toolchain: Vec<PathBuf>,
    /// The user ids commands run as, first to last: each running action has
    /// one of its own, so that per-user limits and file ownership never
    /// join two actions. As many actions run at once as there are ids.
    pub uids: (u32, u32),
    /// The group every command runs as.
    pub gid: u32,
    /// Gives each action a cgroup with its memory and process limits.
    pub cgroups: Option<Cgroups>,
    /// The timeout of an action that sets none.
    pub default_timeout: Duration,
    /// The longest timeout an action may ask for; a longer one is refused.
    pub max_timeout: Duration,
    /// System calls denied on top of the default seccomp filter.
    pub seccomp_deny: Vec<String>,
    /// Resource limits per action.
    pub limits: Limits,
    /// The name reported in ExecutedActionMetadata.worker.
    pub worker_name: String,
    /// Most bytes one action may return: its distinct output blobs, stdout
    /// and stderr together (what would be uploaded). Each file is also
    /// capped while it is written (`limits.max_file_bytes`); this total is
    /// checked before upload, and past it no outputs are returned.
    pub max_output_bytes: u64,
    /// Where access profiles are kept: each action's inputs opened by the
    /// last run of the same command are prefetched at registration.
    /// `None`: no profiles, no prefetching.
    pub profiles: Option<PathBuf>,
    /// Bounds of one action's prefetch.
    pub prefetch: PrefetchLimits,
    /// Runs actions in warm sandbox slots (one per sandbox user, reused
    /// while it stays clean; ADR 0008) instead of a new sandbox each.
    pub warm_sandboxes: bool,
}

impl RunnerConfig {
    /// Defaults for everything but where scratch space and the helper are.
    pub fn new(scratch_root: PathBuf, helper: PathBuf) -> Self {
        RunnerConfig {
            scratch_root,
            helper,
            toolchain: DEFAULT_TOOLCHAIN.iter().map(PathBuf::from).collect(),
            uids: DEFAULT_UIDS,
            gid: DEFAULT_UIDS.0,
            cgroups: None,
            default_timeout: Duration::from_secs(30 * 60),
            max_timeout: Duration::from_secs(2 * 60 * 60),
            seccomp_deny: Vec::new(),
            limits: Limits { max_memory_bytes: 8 << 30, max_scratch_bytes: 4 << 30, ..Limits::default() },
            worker_name: nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default(),
            max_output_bytes: 16 << 30,
            profiles: None,
            prefetch: PrefetchLimits::default(),
            warm_sandboxes: true,
        }
    }
}

pub use casbuild_cas::error::ActionError;

/// The outcome of an action that ran.
#[derive(Debug)]
pub struct Execution {
    /// The result, ready for the action cache.
    pub result: ActionResult,
    /// For failed actions: the hermeticity report and how the command ended.
    pub message: String,
    /// What the command touched in its input root.
    pub access: AccessReport,
    /// How the sandboxed command ended.
    pub report: RunReport,
    /// Whether the Action asked not to be cached.
    pub do_not_cache: bool,
    /// The action's input root.
    pub input_root: Digest,
}

/// Runs actions over a /cas mount.
pub struct Runner {
    config: RunnerConfig,
    mount: Arc<CasMount>,
    cas: Arc<dyn CasInstances>,
    sandbox: Sandbox,
    uids: UidPool,
    next: AtomicU64,
    profiles: Option<Arc<AccessProfiles>>,
    /// The root observer of each sandbox user, once registered on the mount.
    observers: Mutex<HashMap<u32, PathBuf>>,
}

impl Drop for Runner {
    /// A runner given up on (the worker failed to start) takes its tmpfs
    /// off the scratch root too.
    fn drop(&mut self) {
        crate::scratch::unmount_root_tmpfs(&self.config.scratch_root);
    }
}

/// Sandbox user ids not in use; an action holds one for its whole run.
struct UidPool {
    free: std::sync::Mutex<Vec<u32>>,
    available: tokio::sync::Semaphore,
}

/// A user id taken from the pool, given back on drop.
struct Uid<'a> {
    pool: &'a UidPool,
    uid: u32,
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl UidPool {
    fn new(ids: std::ops::RangeInclusive<u32>) -> Self {
        let free: Vec<u32> = ids.rev().collect();
        let available = tokio::sync::Semaphore::new(free.len());
        UidPool { free: std::sync::Mutex::new(free), available }
    }

    /// Waits until an id is free and takes it.
    async fn take(&self) -> Result<Uid<'_>, ActionError> {
        let permit = self.available.acquire().await.map_err(|e| ActionError::Unavailable(e.to_string()))?;
        let uid = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop().expect("a permit means a free id");
        Ok(Uid { pool: self, uid, _permit: permit })
    }
}

impl Drop for Uid<'_> {
    fn drop(&mut self) {
        self.pool.free.lock().unwrap_or_else(|e| e.into_inner()).push(self.uid);
    }
}

/// An input root registered on the mount and the scratch directory,
/// released on drop.
struct Lease<'a> {
    mount: &'a CasMount,
    name: &'a str,
    scratch: &'a std::path::Path,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let _ = self.mount.unregister(self.name);
        crate::scratch::discard(self.scratch);
    }
}

/// One action between registration and unregistration.
struct Run<'a> {
    store: &'a dyn BlobStore,
    action: &'a Action,
    command: &'a Command,
    function: DigestFunction,
    input: PathBuf,
    input_root: Digest,
    scratch: PathBuf,
    writable: Vec<String>,
    name: &'a str,
    instance: &'a str,
    /// The sandbox user the command runs as, held by the caller.
    uid: u32,
    /// Inputs being fetched ahead of the command's opens.
    prefetch: Option<Prefetch>,
    /// Told when the command has ended.
    ran: &'a (dyn Fn() + Send + Sync),
}

fn infra(what: &str) -> impl FnOnce(StoreError) -> ActionError + '_ {
    move |e| ActionError::Unavailable(format!("{what}: {e}"))
}

impl Runner {
    /// A runner; removes scratch directories a killed worker left behind.
    pub fn new(config: RunnerConfig, mount: Arc<CasMount>, cas: Arc<dyn CasInstances>) -> Result<Self, ActionError> {
        crate::scratch::prepare_root(&config.scratch_root).map_err(ActionError::Unavailable)?;
        if config.limits.max_scratch_bytes > 0 {
            crate::scratch::mount_root_tmpfs(&config.scratch_root).map_err(ActionError::Unavailable)?;
        }
        let (first, last) = config.uids;
        if first == 0 || last < first {
            return Err(ActionError::Unavailable(format!(
                "sandbox user ids {first}-{last}: give a non-empty range that does not include root"
            )));
        }
        let mut sandbox = Sandbox::new(&config.helper);
        if config.warm_sandboxes {
            sandbox = sandbox.with_warm_slots();
        }
        if let Some(cgroups) = &config.cgroups {
            sandbox = sandbox.with_cgroups(cgroups.clone());
        }
        let uids = UidPool::new(first..=last);
        let profiles = match &config.profiles {
            Some(dir) => Some(Arc::new(AccessProfiles::open(dir).map_err(ActionError::Unavailable)?)),
            None => None,
        };
        Ok(Runner { config, mount, cas, sandbox, uids, next: AtomicU64::new(1), profiles, observers: Mutex::default() })
    }

    /// Ends the warm sandboxes (they hold the `/cas` mount; call this before
    /// unmounting it) and takes the tmpfs off the scratch root. Actions
    /// still running end theirs when they finish.
    pub async fn close(&self) {
        self.sandbox.close_slots().await;
        let _ = tokio::task::spawn_blocking(crate::scratch::flush).await;
        crate::scratch::unmount_root_tmpfs(&self.config.scratch_root);
    }

    /// The empty tree under the root of sandbox user `uid`'s sandboxes
    /// (`SandboxSpec::root_lower`), whose access log names what a command
    /// looked for on the host; and its name on the mount. One per sandbox
    /// user, registered at its first action, its log cleared for each: a
    /// warm slot's root keeps the same one.
    fn root_observer(
        &self,
        uid: u32,
        instance: &str,
        function: DigestFunction,
    ) -> Result<(PathBuf, String), ActionError> {
        let name = format!("sandbox-{uid}-root");
        let mut registered = self.observers.lock().unwrap_or_else(|e| e.into_inner());
        let path = match registered.get(&uid) {
            Some(path) => self.mount.clear_access_log(&name).map(|()| path.clone()),
            None => self.mount.register_in(&name, Some(instance), function.empty()),
        };
        let path = path.map_err(|e| ActionError::Unavailable(e.to_string()))?;
        registered.insert(uid, path.clone());
        Ok((path, name))
    }

    /// The action's timeout: its own, or the default; past the maximum it
    /// is refused (REAPI: a server must reject a longer timeout than it allows).
    fn timeout_of(&self, action: &Action) -> Result<Duration, ActionError> {
        let Some(t) = &action.timeout else { return Ok(self.config.default_timeout) };
        if t.seconds < 0 || t.nanos < 0 {
            return Err(ActionError::Invalid(format!("the action's timeout {}s {}ns is negative", t.seconds, t.nanos)));
        }
        let asked = Duration::new(t.seconds as u64, t.nanos.min(999_999_999) as u32);
        if asked.is_zero() {
            return Ok(self.config.default_timeout);
        }
        if asked > self.config.max_timeout {
            return Err(ActionError::Invalid(format!(
                "the action's timeout of {} s is over this worker's maximum of {} s (casbuild worker --max-timeout)",
                asked.as_secs(),
                self.config.max_timeout.as_secs()
            )));
        }
        Ok(asked)
    }

    /// The name this runner puts in ActionResults.
    pub fn worker_name(&self) -> &str {
        &self.config.worker_name
    }

    /// Decodes `known` if it is the blob `digest` names, else fetches it.
    async fn decode_or_fetch<M: Message + Default>(
        &self,
        store: &dyn BlobStore,
        digest: &Digest,
        known: Option<Bytes>,
        what: &str,
    ) -> Result<M, ActionError> {
        if let Some(bytes) = known.filter(|b| digest.function.digest_of(b) == *digest) {
            return M::decode(bytes)
                .map_err(|e| ActionError::Invalid(format!("the {what} {digest} does not decode: {e}")));
        }
        self.fetch(store, digest, what).await
    }

    /// Fetches a proto the action needs; absent → MissingBlobs.
    async fn fetch<M: Message + Default>(
        &self,
        store: &dyn BlobStore,
        digest: &Digest,
        what: &str,
    ) -> Result<M, ActionError> {
        let bytes = match store.read_all(digest).await {
            Ok(bytes) => bytes,
            Err(e) if e.is_not_found() => return Err(ActionError::MissingBlobs(vec![*digest])),
            Err(e) => return Err(infra(&format!("fetching the {what}"))(e)),
        };
        M::decode(bytes.as_ref()).map_err(|e| ActionError::Invalid(format!("the {what} {digest} does not decode: {e}")))
    }

    /// Runs `true` in a sandbox over an empty input root, the way every
    /// action runs: a host whose sandbox cannot run (no namespaces, no
    /// cgroups, a seccomp list that forbids starting a program, a toolchain
    /// without `true`) is found before it takes work. `Err` says what failed.
    /// If only a warm slot fails, the runner gives warm slots up and runs a
    /// new sandbox per action (logged).
    pub async fn self_test(&self, instance: &str) -> Result<(), String> {
        match self.run_true(instance).await {
            Err(why) if self.sandbox.uses_warm_slots() => {
                // Warm slots need a recent kernel (overlay layers given as
                // descriptors); a new sandbox per action works without.
                self.sandbox.give_up_warm_slots().await;
                self.run_true(instance).await?;
                tracing::warn!("warm sandbox slots do not work on this host ({why}); every action gets a new sandbox");
                Ok(())
            }
            ran => ran,
        }
    }

    async fn run_true(&self, instance: &str) -> Result<(), String> {
        use casbuild_proto::reapi::command::EnvironmentVariable;
        let function = DigestFunction::Sha256;
        let command = Command {
            arguments: vec!["true".into()],
            environment_variables: vec![EnvironmentVariable { name: "PATH".into(), value: "/usr/bin:/bin".into() }],
            ..Default::default()
        };
        let command_bytes = Bytes::from(command.encode_to_vec());
        let action = Action {
            command_digest: Some(function.digest_of(&command_bytes).to_proto()),
            input_root_digest: Some(function.empty().to_proto()),
            do_not_cache: true,
            ..Default::default()
        };
        let action_bytes = Bytes::from(action.encode_to_vec());
        let digest = function.digest_of(&action_bytes);
        match self.execute_known(instance, &digest, Some((action_bytes, command_bytes))).await {
            Ok(execution) if execution.result.exit_code == 0 => Ok(()),
            Ok(execution) if !execution.message.is_empty() => Err(execution.message),
            Ok(execution) => Err(format!("`true` exited with {}", execution.result.exit_code)),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Runs the action stored under `action_digest` in `instance`.
    pub async fn execute_in(&self, instance: &str, action_digest: &Digest) -> Result<Execution, ActionError> {
        self.execute_known(instance, action_digest, None).await
    }

    /// [`Runner::execute_in`] with the encoded Action and Command when the
    /// caller has them (the scheduler read them to check the inputs): each
    /// is used if it matches its digest, and fetched otherwise.
    pub async fn execute_known(
        &self,
        instance: &str,
        action_digest: &Digest,
        known: Option<(Bytes, Bytes)>,
    ) -> Result<Execution, ActionError> {
        self.execute_known_then(instance, action_digest, known, &|| {}).await
    }

    /// [`Runner::execute_known`] that calls `ran` as soon as the command
    /// has ended, before its outputs are collected and uploaded (so that a
    /// scheduler can start the next command meanwhile).
    pub async fn execute_known_then(
        &self,
        instance: &str,
        action_digest: &Digest,
        known: Option<(Bytes, Bytes)>,
        ran: &(dyn Fn() + Send + Sync),
    ) -> Result<Execution, ActionError> {
        use tracing::Instrument;
        let span = tracing::info_span!("run", action = %action_digest, instance, worker = %self.config.worker_name);
        let started = std::time::Instant::now();
        let execution = self.execute_in_span(instance, action_digest, known, ran).instrument(span.clone()).await;
        let _entered = span.enter();
        let ms = started.elapsed().as_millis() as u64;
        match &execution {
            Ok(done) => tracing::info!(exit_code = done.result.exit_code, ms, "ran"),
            Err(e) => tracing::info!(error = %e, ms, "could not run"),
        }
        execution
    }

    async fn execute_in_span(
        &self,
        instance: &str,
        action_digest: &Digest,
        known: Option<(Bytes, Bytes)>,
        ran: &(dyn Fn() + Send + Sync),
    ) -> Result<Execution, ActionError> {
        let worker_start = SystemTime::now();
        let function = action_digest.function;
        let store = self.cas.instance(instance);
        let (known_action, known_command) = known.unzip();
        let action: Action = self.decode_or_fetch(&*store, action_digest, known_action, "Action").await?;
        let command_digest = child_digest(function, "command_digest", action.command_digest.as_ref())
            .map_err(|e| e.context("Action"))?;
        let input_root = child_digest(function, "input_root_digest", action.input_root_digest.as_ref())
            .map_err(|e| e.context("Action"))?;
        let command: Command = self.decode_or_fetch(&*store, &command_digest, known_command, "Command").await?;
        let writable = output_parents(&command)?;
        if !input_root.is_empty_blob()
            && !store.find_missing(&[input_root]).await.map_err(infra("FindMissing"))?.is_empty()
        {
            return Err(ActionError::MissingBlobs(vec![input_root]));
        }

        let name = format!("{}-{}", &action_digest.hash_hex()[..16], self.next.fetch_add(1, Ordering::Relaxed));
        let fetch_start = SystemTime::now();
        let scratch = self.config.scratch_root.join(&name);
        // The sandbox user goes back to the pool only after the lease below
        // has removed the scratch space: the next action of that user (in
        // its warm slot, whose cgroup it reuses) must not find this one's
        // scratch tmpfs still charged to the group.
        let uid = self.uids.take().await?;
        // Unregisters and removes scratch space however the run ends, also
        // when this future is dropped (the operation was cancelled).
        let _lease = Lease { mount: &self.mount, name: &name, scratch: &scratch };
        let input = self
            .mount
            .register_in(&name, Some(instance), input_root)
            .map_err(|e| ActionError::Unavailable(e.to_string()))?;
        // What the last run of this command opened is fetched while the
        // sandbox starts, until the command ends.
        let profile = self.profiles.as_ref().map(|profiles| {
            let platform = action.platform.as_ref().map(Message::encode_to_vec).unwrap_or_default();
            let key = ProfileKey::new(instance, &command_digest, &platform);
            // One small local file; cheaper to read here than to hand off.
            (key, profiles.load(&key))
        });
        let prefetch = match &profile {
            Some((_, Some(paths))) => self.mount.prefetch(&name, paths.clone(), self.config.prefetch).ok(),
            _ => None,
        };
        let fetch_done = SystemTime::now();
        let run = Run {
            store: &*store,
            action: &action,
            command: &command,
            function,
            input,
            input_root,
            scratch: scratch.clone(),
            writable,
            name: &name,
            instance,
            uid: uid.uid,
            prefetch,
            ran,
        };
        let mut execution = self.run_registered(run).await?;
        if let (Some(profiles), Some((key, known))) = (&self.profiles, profile) {
            let opened = &execution.access.opened;
            if execution.report.error.is_none() && crate::profiles::changed(known.as_deref(), opened) {
                // Written before the result goes out, so that the next run
                // of the command (which may follow at once) finds it.
                let (profiles, opened) = (profiles.clone(), opened.clone());
                let _ = tokio::task::spawn_blocking(move || profiles.store(&key, &opened)).await;
            }
        }
        let metadata = execution.result.execution_metadata.get_or_insert_with(Default::default);
        metadata.worker_start_timestamp = casbuild_proto::timestamp(worker_start);
        metadata.input_fetch_start_timestamp = casbuild_proto::timestamp(fetch_start);
        metadata.input_fetch_completed_timestamp = casbuild_proto::timestamp(fetch_done);
        metadata.worker_completed_timestamp = casbuild_proto::timestamp(SystemTime::now());
        Ok(execution)
    }

    async fn run_registered(&self, run: Run<'_>) -> Result<Execution, ActionError> {
        let Run {
            store,
            action,
            command,
            function,
            input,
            input_root,
            scratch,
            writable,
            name,
            instance,
            uid,
            prefetch,
            ran,
        } = run;
        let mut spec = SandboxSpec::new(input, scratch, command.arguments.clone());
        spec.work_dir = PathBuf::from(DEFAULT_WORK_DIR);
        spec.cwd = command.working_directory.clone();
        spec.env = command.environment_variables.iter().map(|v| (v.name.clone(), v.value.clone())).collect();
        spec.writable_dirs = writable;
        let outputs = crate::outputs::declared_from_root(command);
        spec.toolchain = self.config.toolchain.clone();
        spec.gid = self.config.gid;
        spec.limits = self.config.limits.clone();
        spec.seccomp_deny = self.config.seccomp_deny.clone();
        spec.timeout_ms = Some(self.timeout_of(action)?.as_millis() as u64);
        spec.uid = uid;
        let observer = self.root_observer(uid, instance, function)?;
        spec.root_lower = Some(observer.0);
        spec.validate()?;

        let exec_start = SystemTime::now();
        let report = self.sandbox.run(&spec).await.map_err(|e| ActionError::Unavailable(e.to_string()))?;
        let exec_done = SystemTime::now();
        ran();
        // What the prefetch has not fetched yet is of no use now.
        drop(prefetch);
        // Inputs read while they streamed in were not verified yet: no result
        // is built on bytes that turn out not to match their digest.
        self.mount.verify_streamed(name).await.map_err(|e| {
            ActionError::Unavailable(format!("an input the command read failed verification afterwards: {e}"))
        })?;
        let access = self.mount.access_report(name).unwrap_or_default();
        let observed = self.mount.access_report(&observer.1).unwrap_or_default();
        if let Some(error) = &report.error {
            // The command never ran (not found, not executable, bad set-up).
            let mut result = ActionResult { exit_code: 127, ..Default::default() };
            let stderr = Bytes::from(format!("casbuild: {error}\n"));
            let digest = function.digest_of(&stderr);
            store.write_batch(vec![(digest, stderr)]).await.map_err(infra("uploading stderr"))?;
            result.stderr_digest = Some(digest.to_proto());
            return Ok(Execution { result, message: error.clone(), access, report, do_not_cache: true, input_root });
        }

        metrics::histogram!("casbuild_sandbox_setup_seconds").record(report.setup_micros as f64 / 1e6);
        let mut message = String::new();
        if !report.success() {
            let undeclared = undeclared_inputs(&spec, &outputs, &access, &observed);
            if !undeclared.paths.is_empty() {
                metrics::counter!("casbuild_hermeticity_violations_total").increment(1);
            }
            message = failure_message(&report, &spec, &undeclared);
        }
        if !message.is_empty() {
            // Clients show a failed action's stderr; put the report where it is seen.
            append_report(&Sandbox::stderr_path(&spec), &message).await;
        }
        let upload_start = SystemTime::now();
        let upper = Sandbox::upper_path(&spec);
        let collected = tokio::task::spawn_blocking({
            let command = command.clone();
            let cwd = spec.cwd.clone();
            move || collect(&upper, &cwd, &command, function)
        })
        .await
        .map_err(|e| ActionError::Unavailable(e.to_string()))?
        .map_err(ActionError::Invalid)?;
        let mut result = collected.result;
        let mut files = collected.files;
        for (path, field) in [
            (Sandbox::stdout_path(&spec), &mut result.stdout_digest),
            (Sandbox::stderr_path(&spec), &mut result.stderr_digest),
        ] {
            let p = path.clone();
            let digest = tokio::task::spawn_blocking(move || hash_file(&p, function))
                .await
                .map_err(|e| ActionError::Unavailable(e.to_string()))?
                .map_err(|e| ActionError::Unavailable(format!("hashing {}: {e}", path.display())))?;
            *field = Some(digest.to_proto());
            if !digest.is_empty_blob() {
                files.insert(digest, path);
            }
        }
        let mut blobs = collected.blobs;
        let mut do_not_cache = action.do_not_cache;
        let total: u64 = files.keys().chain(blobs.iter().map(|(d, _)| d)).map(|d| d.size_bytes).sum();
        if total > self.config.max_output_bytes {
            // Nothing of it is uploaded; the logs still are if they fit.
            let limit = self.config.max_output_bytes;
            result.output_files.clear();
            result.output_directories.clear();
            result.output_symlinks.clear();
            blobs.clear();
            let logs: Vec<Digest> = [&result.stdout_digest, &result.stderr_digest]
                .into_iter()
                .filter_map(|d| d.as_ref().and_then(|d| Digest::from_proto(function, d).ok()))
                .collect();
            let log_bytes: u64 = logs.iter().map(|d| d.size_bytes).sum();
            files.retain(|digest, _| log_bytes <= limit && logs.contains(digest));
            if log_bytes > limit {
                result.stdout_digest = None;
                result.stderr_digest = None;
            }
            let note = format!(
                "the action's outputs and logs total {total} bytes, over this worker's limit of {limit} \
                 (casbuild worker --max-output-size); no outputs were returned"
            );
            message = if message.is_empty() { note } else { format!("{message}\n{note}") };
            do_not_cache = true;
        }
        upload_missing(store, blobs, &files).await.map_err(infra("uploading outputs"))?;
        let upload_done = SystemTime::now();

        result.exit_code = match (report.exit_code, report.signal) {
            (Some(code), _) => code,
            (None, Some(signal)) => 128 + signal,
            (None, None) => 128 + libc::SIGKILL,
        };
        result.execution_metadata = Some(ExecutedActionMetadata {
            worker: self.config.worker_name.clone(),
            execution_start_timestamp: casbuild_proto::timestamp(exec_start),
            execution_completed_timestamp: casbuild_proto::timestamp(exec_done),
            output_upload_start_timestamp: casbuild_proto::timestamp(upload_start),
            output_upload_completed_timestamp: casbuild_proto::timestamp(upload_done),
            ..Default::default()
        });
        Ok(Execution { result, message, access, report, do_not_cache, input_root })
    }
}

/// What a failed action's stderr gets appended: `message`, each line
/// prefixed with `casbuild: `. Clients that show the command's own stderr
/// (`casbuild cc`) strip it again.
pub fn report_suffix(message: &str) -> String {
    message.lines().map(|line| format!("casbuild: {line}\n")).collect()
}

/// Appends the report of `message` to a stderr file.
async fn append_report(stderr: &std::path::Path, message: &str) {
    use tokio::io::AsyncWriteExt;
    let text = report_suffix(message);
    let file = tokio::fs::OpenOptions::new().append(true).open(stderr).await;
    // Flushed: the file is read (and uploaded) right after, and a tokio
    // file's write may still be on a blocking thread when it returns.
    let written = async {
        let mut file = file?;
        file.write_all(text.as_bytes()).await?;
        file.flush().await
    };
    if let Err(e) = written.await {
        tracing::warn!("appending the hermeticity report to {}: {e}", stderr.display());
    }
}

/// The absolute paths the command looked up and the sandbox's root does not
/// have, from the access log of the tree under that root: every name there
/// but those the sandbox itself puts at the top (the toolchain, the working
/// tree, /proc, /dev, /tmp, /etc), whose lookups set-up made, and the kernel
/// interfaces that libc and libselinux probe in every program (/sys,
/// /selinux), which would name nothing the action needs.
fn host_lookups(observed: &AccessReport, spec: &SandboxSpec) -> Vec<String> {
    let mut ours = spec.own_top_names();
    ours.extend(["sys", "selinux"].map(String::from));
    observed.not_found.iter().filter(|name| !ours.contains(*name)).map(|name| format!("/{name}")).collect()
}

/// How a failed command ended, and the `undeclared` paths it tried to read.
pub fn failure_message(report: &RunReport, spec: &SandboxSpec, undeclared: &Undeclared) -> String {
    let limits = &spec.limits;
    let mut lines = Vec::new();
    if report.memory_exceeded {
        lines.push(format!(
            "the action exceeded its {} memory limit (casbuild worker --max-memory); the kernel killed it",
            human_bytes(limits.max_memory_bytes)
        ));
    }
    if report.processes_exhausted {
        lines.push(format!(
            "the action reached its limit of {} processes (casbuild worker --max-processes); a fork failed",
            limits.max_processes
        ));
    }
    if report.scratch_full {
        lines.push(format!(
            "the action filled its {} of scratch space: its working tree, /tmp and /dev/shm together \
             (casbuild worker --max-scratch-size)",
            human_bytes(limits.max_scratch_bytes)
        ));
    }
    if report.timed_out {
        lines.push("the action timed out and everything it started was killed".to_owned());
    } else if let Some(signal) = report.signal {
        lines.push(format!("the command was killed by signal {signal}"));
    } else if let Some(code) = report.exit_code {
        lines.push(format!("the command exited with status {code}"));
    }
    for path in undeclared.paths.iter().take(REPORT_LINES) {
        lines.push(format!("undeclared input: {path} (lookup: not found)"));
    }
    // Misses the logs did not keep (past their bound) are counted too.
    let more = undeclared.paths.len().saturating_sub(REPORT_LINES) as u64 + undeclared.dropped;
    if more > 0 {
        lines.push(format!("... and {more} more undeclared paths"));
    }
    lines.extend(report.blocked.iter().cloned());
    lines.join("\n")
}

/// The paths a command looked up and did not find, for its report.
pub struct Undeclared {
    /// Those the access logs kept.
    pub paths: Vec<String>,
    /// How many more the logs did not keep (past their bound).
    pub dropped: u64,
}

/// The paths a command looked up and did not find that are neither the
/// worker's own (the directories it created for outputs, and their parents)
/// nor the command's to create (declared `outputs`, from the input root, and
/// what lies beneath them): in its input root (`access`), or elsewhere in
/// the sandbox (`observed`, the log of the tree under its root; named
/// absolute).
pub fn undeclared_inputs(
    spec: &SandboxSpec,
    outputs: &[String],
    access: &AccessReport,
    observed: &AccessReport,
) -> Undeclared {
    let created = &spec.writable_dirs;
    let ours = |path: &str| {
        created.iter().any(|dir| dir == path || dir.starts_with(&format!("{path}/")))
            || outputs.iter().any(|out| out == path || path.starts_with(&format!("{out}/")))
    };
    let outside = host_lookups(observed, spec);
    Undeclared {
        paths: access.not_found.iter().filter(|p| !ours(p)).cloned().chain(outside).collect(),
        dropped: access.not_found_dropped + observed.not_found_dropped,
    }
}

/// `bytes` for people: `2 GiB`, `512 MiB`, `1000 bytes`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    let mut unit = None;
    let mut value = bytes as f64;
    for name in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = Some(name);
    }
    match unit {
        None => format!("{bytes} bytes"),
        Some(unit) if value.fract() == 0.0 => format!("{value:.0} {unit}"),
        Some(unit) => format!("{value:.1} {unit}"),
    }
}

/// The declared inputs a successful action never touched: files in the
/// input root that were neither opened nor looked up. `declared` lists the
/// input root's file paths.
pub fn unread_inputs<'a>(declared: impl IntoIterator<Item = &'a str>, access: &AccessReport) -> Vec<&'a str> {
    let touched = access.touched();
    declared.into_iter().filter(|p| !touched.contains(p)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_hit_are_named_with_their_size() {
        let report = RunReport { signal: Some(9), memory_exceeded: true, ..Default::default() };
        let mut spec = SandboxSpec::new("/in".into(), "/scratch".into(), vec!["cc".into()]);
        spec.limits = Limits { max_memory_bytes: 2 << 30, ..Default::default() };
        let none = AccessReport::default();
        let message = failure_message(&report, &spec, &undeclared_inputs(&spec, &[], &none, &none));
        assert!(message.starts_with("the action exceeded its 2 GiB memory limit"), "{message}");
        assert_eq!(human_bytes(1536 << 20), "1.5 GiB");
        assert_eq!(human_bytes(1000), "1000 bytes");
    }

    #[test]
    fn the_report_names_undeclared_paths_but_not_the_workers_own_directories() {
        let mut access = AccessReport::default();
        for path in ["bazel-out", "bazel-out/bin", "pkg", "src/config.h", "bazel-out/bin/pkg/out.o", "gen/x/y"] {
            access.not_found.insert(path.to_owned());
        }
        let report = RunReport { exit_code: Some(1), ..Default::default() };
        let mut spec = SandboxSpec::new("/in".into(), "/scratch".into(), vec!["cc".into()]);
        spec.writable_dirs = vec!["bazel-out/bin/pkg".to_owned()];
        let outputs = ["bazel-out/bin/pkg/out.o".to_owned(), "gen".to_owned()];
        let undeclared = undeclared_inputs(&spec, &outputs, &access, &AccessReport::default());
        let message = failure_message(&report, &spec, &undeclared);
        assert_eq!(
            message,
            "the command exited with status 1\n\
             undeclared input: pkg (lookup: not found)\n\
             undeclared input: src/config.h (lookup: not found)"
        );
    }

    #[test]
    fn host_paths_are_named_absolute_and_misses_past_the_logs_bound_counted() {
        let access = AccessReport { not_found_dropped: 2, ..Default::default() };
        let mut observed = AccessReport { not_found_dropped: 1, ..Default::default() };
        for name in ["home", "proc", "usr", "selinux"] {
            observed.not_found.insert(name.to_owned());
        }
        let report = RunReport { exit_code: Some(1), ..Default::default() };
        let spec = SandboxSpec::new("/in".into(), "/scratch".into(), vec!["cc".into()]);
        let message = failure_message(&report, &spec, &undeclared_inputs(&spec, &[], &access, &observed));
        assert_eq!(
            message,
            "the command exited with status 1\n\
             undeclared input: /home (lookup: not found)\n\
             ... and 3 more undeclared paths"
        );
    }
}

//! `casbuild cc COMPILER ARGS...`, the wrapper itself: a compile-only
//! command of one C or C++ source is preprocessed here and compiled on the
//! cluster as a REAPI action through the host's daemon; everything else runs
//! locally, unchanged, with a typed reason the daemon counts. See docs/CC.md
//! for why inputs travel preprocessed.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::Context;
use bytes::Bytes;
use casbuild_cas::action::ActionSpec;
use casbuild_cas::digest::{Digest, DigestFunction};
use casbuild_cas::input_root::{Entry, InputRoot};
use casbuild_coordinator::graph::escapes;
use casbuild_exec::runner::report_suffix;
use casbuild_proto::cc::{
    daemon_reply, daemon_request, Blob, Compile as CompileRequest, GetStats, LocalNote, LocalSlot, Shutdown, Stats,
};

use crate::args::{classify, Compile};
use crate::reason::{Local, LocalKind};
use crate::socket::DaemonConnection;

/// The platform property naming the compiler an action needs: the digest of
/// its binary and `--version` output. Workers offer it for each compiler
/// they have (`casbuild worker --compiler PATH`).
pub const COMPILER_PROPERTY: &str = "casbuild-compiler";

/// The names `--install-links` creates, each resolving to the next compiler
/// of that name on PATH.
pub const MASQUERADE: &[&str] = &["gcc", "g++", "cc", "c++"];

/// What `daemon_control` does with the daemon's statistics and life.
#[derive(Clone, Copy, Debug, Default)]
pub struct Control {
    pub show_stats: bool,
    pub zero_stats: bool,
    pub stop_daemon: bool,
}

/// --show-stats, --zero-stats, --stop-daemon for the daemon of `remote`.
pub async fn daemon_control(remote: &str, instance: &str, args: Control) -> anyhow::Result<()> {
    let Some(mut daemon) = DaemonConnection::existing(remote, instance).await else {
        println!("no casbuild daemon runs for {remote} (it starts with the first compile)");
        return Ok(());
    };
    if args.show_stats || args.zero_stats {
        let reply = daemon.ask(daemon_request::Request::Stats(GetStats { zero: args.zero_stats })).await?;
        let Some(daemon_reply::Reply::Stats(stats)) = reply.reply else {
            anyhow::bail!("the daemon sent no statistics")
        };
        if args.show_stats {
            print!("{}", render_stats(&stats));
        } else {
            println!("statistics zeroed");
        }
    }
    if args.stop_daemon {
        daemon.ask(daemon_request::Request::Shutdown(Shutdown {})).await?;
        println!("daemon for {remote} stopped");
    }
    Ok(())
}

/// The statistics as `--show-stats` prints them.
pub fn render_stats(stats: &Stats) -> String {
    let mut out = format!("casbuild cc statistics (daemon for {}, up {} s)\n", stats.remote, stats.uptime_secs);
    let mut line = |name: &str, value: String| out.push_str(&format!("{name:<44}{value:>10}\n"));
    line("Compile requests", stats.compile_requests.to_string());
    line("Cache hits (L1, in the daemon)", stats.l1_hits.to_string());
    line("Cache hits (remote)", stats.remote_hits.to_string());
    line("Executed remotely", stats.executed_remotely.to_string());
    line("  of which failed to compile", stats.remote_compile_errors.to_string());
    line("Lookups skipped by the existence filter", stats.filter_skipped_lookups.to_string());
    line("Local fallbacks", stats.local_fallbacks.values().sum::<u64>().to_string());
    for (why, count) in &stats.local_fallbacks {
        line(&format!("  {why}"), count.to_string());
    }
    line("Not sent (ran locally)", stats.not_sent.values().sum::<u64>().to_string());
    for (why, count) in &stats.not_sent {
        line(&format!("  {why}"), count.to_string());
    }
    line("Bytes uploaded", stats.bytes_uploaded.to_string());
    line("Existence filter held", if stats.has_filter { "yes" } else { "no" }.to_owned());
    out
}

/// `name` resolved on PATH (or as a path), skipping the directory `skip`.
pub fn find_on_path(name: &str, skip: Option<&Path>) -> Option<PathBuf> {
    if name.contains('/') {
        return Some(PathBuf::from(name));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).filter(|dir| !dir.as_os_str().is_empty()).find_map(|dir| {
        if skip.is_some_and(|s| dir.canonicalize().ok().as_deref() == Some(s)) {
            return None;
        }
        let candidate = dir.join(name);
        let meta = std::fs::metadata(&candidate).ok()?;
        (meta.is_file() && meta.mode() & 0o111 != 0).then_some(candidate)
    })
}

/// Where the wrapper sends compiles.
pub struct Target<'a> {
    /// The cluster, as grpc://HOST:PORT.
    pub remote: &'a str,
    pub instance: &'a str,
    /// Where compiler identities are remembered.
    pub memo_dir: &'a Path,
}

/// Compiles, remotely when possible; returns the exit code to leave with.
/// `skip` is a directory of masquerade links not to find the compiler in.
pub async fn wrap(compiler: &str, args: &[String], target: &Target<'_>, skip: Option<&Path>) -> i32 {
    let (remote, instance) = (target.remote, target.instance);
    let Some(path) = find_on_path(compiler, skip) else {
        eprintln!("casbuild cc: compiler {compiler:?} not found on PATH");
        return 127;
    };
    let compile = match classify(args) {
        Ok(compile) => compile,
        Err(why) => {
            tracing::debug!("running locally: {why}");
            note(remote, instance, &why).await;
            return local(&path, args);
        }
    };
    match remote_compile(&path, &compile, target).await {
        Ok(code) => code,
        Err(Fallback::Silent) => {
            let why =
                Local::new(LocalKind::PreprocessingFailed, "preprocessing failed (the compiler's own error shown)");
            note(remote, instance, &why).await;
            local(&path, args)
        }
        Err(Fallback::Warn(why)) => {
            warn(&format!("casbuild cc: compiling {} locally: {why}\n", compile.source));
            // Hold one of the daemon's local slots while compiling here.
            let mut slot = DaemonConnection::existing(remote, instance).await;
            if let Some(daemon) = slot.as_mut() {
                let request = LocalSlot { reason: Some(why.to_proto()) };
                if daemon.ask(daemon_request::Request::LocalSlot(request)).await.is_err() {
                    slot = None;
                }
            }
            let code = local(&path, args);
            drop(slot);
            code
        }
    }
}

/// Writes one line to stderr in a single write, so that the lines of
/// parallel compiles (make -j) do not interleave mid-line.
fn warn(line: &str) {
    let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
}

/// Tells a running daemon (if any) about a command that ran locally.
async fn note(remote: &str, instance: &str, reason: &Local) {
    if let Some(mut daemon) = DaemonConnection::existing(remote, instance).await {
        let _ = daemon.ask(daemon_request::Request::Note(LocalNote { reason: Some(reason.to_proto()) })).await;
    }
}

/// Runs the command unchanged on this host.
fn local(compiler: &Path, args: &[String]) -> i32 {
    match std::process::Command::new(compiler).args(args).status() {
        Ok(status) => status.code().unwrap_or(1),
        Err(e) => {
            eprintln!("casbuild cc: running {}: {e}", compiler.display());
            127
        }
    }
}

/// Why a compile runs locally after all.
enum Fallback {
    /// Preprocessing failed: the local compile reports the compiler's own error.
    Silent,
    /// The cluster could not do it (unreachable, infrastructure failure).
    Warn(Local),
}

/// Anything else that went wrong on the way is an infrastructure failure.
impl From<anyhow::Error> for Fallback {
    fn from(e: anyhow::Error) -> Self {
        Fallback::Warn(Local::new(LocalKind::Infrastructure, format!("{e:#}")))
    }
}

async fn remote_compile(compiler: &Path, compile: &Compile, target: &Target<'_>) -> Result<i32, Fallback> {
    let (remote, instance) = (target.remote, target.instance);
    let function = DigestFunction::Blake3;
    let identity = compiler_identity(compiler, target.memo_dir).context("identifying the compiler")?;

    // Preprocess here, with every preprocessor flag and the dependency file.
    let mut command = std::process::Command::new(compiler);
    command.args(&compile.preprocess);
    if compile.depfile && !compile.depfile_named {
        let depfile = Path::new(&compile.output).with_extension("d");
        command.arg("-MF").arg(depfile);
    }
    if compile.depfile && !compile.target_named {
        command.arg("-MT").arg(&compile.output);
    }
    // To stdout: the text goes straight into memory, no temporary file.
    command.arg("-E").arg(&compile.source);
    let out = command.stdin(Stdio::null()).output().context("running the preprocessor")?;
    if !out.status.success() {
        return Err(Fallback::Silent);
    }
    std::io::Write::write_all(&mut std::io::stderr(), &out.stderr).ok();

    // The action: compile the preprocessed file with the code-generation flags.
    let text = Bytes::from(out.stdout);
    let input = function.digest_of(&text);
    let mut root = InputRoot::default();
    let mut blobs = vec![(input, text)];
    root.insert("input.i", Entry::File { digest: input, executable: false }).map_err(anyhow::Error::msg)?;
    // The source itself, at the path the line markers name, only so that
    // diagnostics can quote its lines as a local compile does.
    if escapes(&compile.source).is_none() && compile.source != "input.i" {
        if let Ok(source) = std::fs::read(&compile.source) {
            let digest = function.digest_of(&source);
            let entry = Entry::File { digest, executable: false };
            if root.insert(&compile.source, entry).is_ok() {
                blobs.push((digest, Bytes::from(source)));
            }
        }
    }
    let (root_digest, directories) = root.encode(function);
    blobs.extend(directories);
    let mut argv = vec![compiler.to_string_lossy().into_owned()];
    argv.extend(compile.compile.iter().cloned());
    argv.extend(["-x", compile.language.preprocessed(), "-c", "input.i", "-o", "output.o"].map(String::from));
    // The locale only changes how diagnostics are worded, as it would locally.
    let mut env = BTreeMap::from([("PATH".to_owned(), "/usr/local/bin:/usr/bin:/bin".to_owned())]);
    for name in ["LANG", "LC_ALL", "LC_CTYPE", "LC_MESSAGES"] {
        if let Ok(value) = std::env::var(name) {
            env.insert(name.to_owned(), value);
        }
    }
    let action = ActionSpec {
        argv,
        env,
        outputs: vec!["output.o".into()],
        input_root: Some(root_digest),
        timeout_secs: Some(600),
        platform: BTreeMap::from([(COMPILER_PROPERTY.to_owned(), identity)]),
    }
    .encode(function);

    blobs.extend(action.blobs.iter().cloned());
    let mut daemon = DaemonConnection::connect_or_start(remote, instance)
        .await
        .map_err(|e| Fallback::Warn(Local::new(LocalKind::NoDaemon, format!("no daemon: {e:#}"))))?;
    // First without the files' contents: a hit needs none. Only when the
    // cluster lacks some does the daemon ask for them.
    let request = |with_data: &dyn Fn(&Digest) -> bool, resent: bool| {
        daemon_request::Request::Compile(CompileRequest {
            action_hash: action.digest.hash_hex(),
            action_size: action.digest.size_bytes as i64,
            blobs: blobs
                .iter()
                .map(|(digest, data)| Blob {
                    hash: digest.hash_hex(),
                    size_bytes: digest.size_bytes as i64,
                    data: if with_data(digest) { data.to_vec() } else { Vec::new() },
                })
                .collect(),
            output_path: "output.o".into(),
            source: compile.source.clone(),
            resent,
        })
    };
    let small = |digest: &Digest| digest.size_bytes <= 16 << 10;
    let mut reply = daemon.ask(request(&small, false)).await?.reply;
    if let Some(daemon_reply::Reply::NeedBlobs(needed)) = &reply {
        let needed: std::collections::HashSet<&str> = needed.hashes.iter().map(String::as_str).collect();
        let wanted = |digest: &Digest| small(digest) || needed.contains(digest.hash_hex().as_str());
        reply = daemon.ask(request(&wanted, true)).await?.reply;
    }
    let compiled = match reply {
        Some(daemon_reply::Reply::Compiled(compiled)) => compiled,
        Some(daemon_reply::Reply::Fallback(why)) => return Err(Fallback::Warn(Local::from_proto(&why))),
        other => return Err(anyhow::anyhow!("the daemon answered {other:?}").into()),
    };
    let _ = std::io::Write::write_all(&mut std::io::stdout(), &compiled.stdout);
    // The compiler's own messages, without the worker's report on failures.
    let suffix = report_suffix(&compiled.message);
    let own = compiled.stderr.strip_suffix(suffix.as_bytes()).unwrap_or(&compiled.stderr);
    let _ = std::io::Write::write_all(&mut std::io::stderr(), own);
    if compiled.exit_code != 0 {
        return Ok(compiled.exit_code);
    }
    let dest = Path::new(&compile.output);
    let temporary = dest.with_extension("o.casbuild-tmp");
    std::fs::write(&temporary, &compiled.output).with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, dest).with_context(|| format!("writing {}", dest.display()))?;
    Ok(0)
}

/// The compiler's identity: a digest of its binary and its `--version`
/// output, remembered in `memo_dir` per binary (path, size, mtime, inode).
pub fn compiler_identity(compiler: &Path, memo_dir: &Path) -> anyhow::Result<String> {
    let real = compiler.canonicalize().with_context(|| format!("{}", compiler.display()))?;
    let meta = std::fs::metadata(&real)?;
    let key = format!(
        "{}\0{}\0{}\0{}",
        real.display(),
        meta.len(),
        meta.mtime_nsec() + meta.mtime() * 1_000_000_000,
        meta.ino()
    );
    let memo = memo_dir.join(DigestFunction::Blake3.digest_of(key.as_bytes()).hash_hex());
    if let Ok(identity) = std::fs::read_to_string(&memo) {
        return Ok(identity);
    }
    let version = std::process::Command::new(compiler).arg("--version").output()?;
    let mut hasher = DigestFunction::Blake3.hasher();
    hasher.update(&std::fs::read(&real)?);
    hasher.update(&version.stdout);
    let identity = hasher.finish().hash_hex();
    if let Some(parent) = memo.parent() {
        let _ = std::fs::create_dir_all(parent);
        let temporary = memo.with_extension(format!("tmp-{}", std::process::id()));
        if std::fs::write(&temporary, &identity).is_ok() {
            let _ = std::fs::rename(&temporary, &memo);
        }
    }
    Ok(identity)
}

//! `casbuild cc COMPILER ARGS...`: a compiler wrapper for make and ninja. A
//! compile-only command of one C or C++ source is preprocessed here and
//! compiled on the cluster as a REAPI action; everything else runs locally,
//! unchanged. See docs/CC.md for why inputs travel preprocessed.

mod args;
pub mod daemon;
mod socket;

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

use crate::config::default_data_dir;
use args::{classify, Compile};
use socket::DaemonConnection;

/// The platform property naming the compiler an action needs: the digest of
/// its binary and `--version` output. Workers offer it for each compiler
/// they have (`casbuild worker --compiler PATH`).
pub const COMPILER_PROPERTY: &str = "casbuild-compiler";

/// The names `--install-links` creates, each resolving to the next compiler
/// of that name on PATH.
pub const MASQUERADE: &[&str] = &["gcc", "g++", "cc", "c++"];

#[derive(clap::Args)]
pub struct Args {
    /// The cluster, as grpc://HOST:PORT.
    #[arg(long, env = "CASBUILD_REMOTE", default_value = "grpc://127.0.0.1:8980")]
    remote: String,
    /// REAPI instance name.
    #[arg(long, env = "CASBUILD_INSTANCE", default_value = "")]
    instance: String,
    /// Create gcc, g++, cc and c++ links to casbuild in DIR: put DIR first on
    /// PATH and every compile goes through casbuild.
    #[arg(long, value_name = "DIR", conflicts_with = "command")]
    install_links: Option<PathBuf>,
    /// Print the daemon's statistics: requests, hits, remote runs, fallbacks.
    #[arg(long, conflicts_with = "command")]
    show_stats: bool,
    /// Reset the daemon's statistics (after printing them with --show-stats).
    #[arg(long, conflicts_with = "command")]
    zero_stats: bool,
    /// Stop the daemon for this remote.
    #[arg(long, conflicts_with = "command")]
    stop_daemon: bool,
    /// The compiler and its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "COMPILER ARGS")]
    command: Vec<String>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(dir) = &args.install_links {
        return install_links(dir);
    }
    if args.show_stats || args.zero_stats || args.stop_daemon {
        return daemon_control(&args).await;
    }
    let Some((compiler, rest)) = args.command.split_first() else {
        anyhow::bail!("give the compiler and its arguments, e.g. `casbuild cc gcc -c hello.c -o hello.o`");
    };
    let code = wrap(compiler, rest, &args.remote, &args.instance, None).await;
    std::process::exit(code)
}

/// Runs as `gcc` (or another masquerade name) from an `--install-links` directory.
pub fn masquerade(name: &str, args: Vec<String>) -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("casbuild cc: cannot start: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let skip = std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| which_dir(&p))
        .or_else(|| std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)));
    let remote = std::env::var("CASBUILD_REMOTE").unwrap_or_else(|_| "grpc://127.0.0.1:8980".into());
    let instance = std::env::var("CASBUILD_INSTANCE").unwrap_or_default();
    let code = runtime.block_on(wrap(name, &args, &remote, &instance, skip.as_deref()));
    std::process::ExitCode::from(code.clamp(0, 255) as u8)
}

/// The directory `argv0` was run from, when it names one (directly or via PATH).
fn which_dir(argv0: &Path) -> Option<PathBuf> {
    if argv0.components().count() > 1 {
        return argv0.parent().and_then(|p| p.canonicalize().ok());
    }
    let name = argv0.to_str()?;
    find_on_path(name, None).and_then(|p| p.parent().and_then(|d| d.canonicalize().ok()))
}

fn install_links(dir: &Path) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding casbuild itself")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for name in MASQUERADE {
        let link = dir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&exe, &link).with_context(|| format!("creating {}", link.display()))?;
    }
    println!("{}: {} -> {}; put it first on PATH", dir.display(), MASQUERADE.join(", "), exe.display());
    Ok(())
}

/// --show-stats, --zero-stats, --stop-daemon.
async fn daemon_control(args: &Args) -> anyhow::Result<()> {
    let Some(mut daemon) = DaemonConnection::existing(&args.remote, &args.instance).await else {
        println!("no casbuild daemon runs for {} (it starts with the first compile)", args.remote);
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
        println!("daemon for {} stopped", args.remote);
    }
    Ok(())
}

/// The statistics as `--show-stats` prints them.
fn render_stats(stats: &Stats) -> String {
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

/// Compiles, remotely when possible; returns the exit code to leave with.
async fn wrap(compiler: &str, args: &[String], remote: &str, instance: &str, skip: Option<&Path>) -> i32 {
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
    match remote_compile(&path, &compile, remote, instance).await {
        Ok(code) => code,
        Err(Fallback::Silent) => {
            note(remote, instance, "preprocessing failed (the compiler's own error shown)").await;
            local(&path, args)
        }
        Err(Fallback::Warn(why)) => {
            let why = format!("{why:#}");
            warn(&format!("casbuild cc: compiling {} locally: {why}\n", compile.source));
            // Hold one of the daemon's local slots while compiling here.
            let mut slot = DaemonConnection::existing(remote, instance).await;
            if let Some(daemon) = slot.as_mut() {
                if daemon.ask(daemon_request::Request::LocalSlot(LocalSlot { reason: why })).await.is_err() {
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
async fn note(remote: &str, instance: &str, reason: &str) {
    if let Some(mut daemon) = DaemonConnection::existing(remote, instance).await {
        let _ = daemon.ask(daemon_request::Request::Note(LocalNote { reason: reason.to_owned() })).await;
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
    Warn(anyhow::Error),
}

impl From<anyhow::Error> for Fallback {
    fn from(e: anyhow::Error) -> Self {
        Fallback::Warn(e)
    }
}

async fn remote_compile(compiler: &Path, compile: &Compile, remote: &str, instance: &str) -> Result<i32, Fallback> {
    let function = DigestFunction::Blake3;
    let identity = compiler_identity(compiler).context("identifying the compiler")?;

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
    let mut daemon = DaemonConnection::connect_or_start(remote, instance).await.context("no daemon")?;
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
        Some(daemon_reply::Reply::Fallback(why)) => return Err(Fallback::Warn(anyhow::anyhow!(why))),
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
/// output, remembered per binary (path, size, mtime, inode).
pub fn compiler_identity(compiler: &Path) -> anyhow::Result<String> {
    let real = compiler.canonicalize().with_context(|| format!("{}", compiler.display()))?;
    let meta = std::fs::metadata(&real)?;
    let key = format!(
        "{}\0{}\0{}\0{}",
        real.display(),
        meta.len(),
        meta.mtime_nsec() + meta.mtime() * 1_000_000_000,
        meta.ino()
    );
    let memo = default_data_dir().join("compilers").join(DigestFunction::Blake3.digest_of(key.as_bytes()).hash_hex());
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

//! `casbuild cc COMPILER ARGS...`: a compiler wrapper for make and ninja. A
//! compile-only command of one C or C++ source is preprocessed here and
//! compiled on the cluster as a REAPI action; everything else runs locally,
//! unchanged. See docs/CC.md for why inputs travel preprocessed.

mod args;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use casbuild_coordinator::graph::escapes;
use casbuild_exec::runner::report_suffix;
use casbuild_fs::action::ActionSpec;
use casbuild_fs::digest::{Digest, DigestFunction};
use casbuild_fs::input_root::{Entry, InputRoot};
use casbuild_fs::store::{BlobStore, RemoteStore, RemoteStoreOptions};
use casbuild_proto::longrunning::operation;
use casbuild_proto::reapi::execution_client::ExecutionClient;
use casbuild_proto::reapi::{ExecuteRequest, ExecuteResponse};
use prost::Message;

use crate::config::default_data_dir;
use args::{classify, Compile};

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
    /// The compiler and its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "COMPILER ARGS")]
    command: Vec<String>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(dir) = &args.install_links {
        return install_links(dir);
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

/// `name` resolved on PATH (or as a path), skipping the directory `skip`.
fn find_on_path(name: &str, skip: Option<&Path>) -> Option<PathBuf> {
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
            tracing::debug!("compiling locally: {why}");
            return local(&path, args);
        }
    };
    match remote_compile(&path, &compile, remote, instance).await {
        Ok(code) => code,
        Err(Fallback::Silent) => local(&path, args),
        Err(Fallback::Warn(why)) => {
            eprintln!("casbuild cc: compiling {} locally: {why:#}", compile.source);
            local(&path, args)
        }
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
    let scratch = tempfile::Builder::new().prefix("casbuild-cc-").tempdir().context("a temporary directory")?;
    let preprocessed = scratch.path().join("input.i");

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
    command.arg("-E").arg(&compile.source).arg("-o").arg(&preprocessed);
    let out = command.stdin(Stdio::null()).output().context("running the preprocessor")?;
    if !out.status.success() {
        return Err(Fallback::Silent);
    }
    std::io::Write::write_all(&mut std::io::stderr(), &out.stderr).ok();

    // The action: compile the preprocessed file with the code-generation flags.
    let text = Bytes::from(std::fs::read(&preprocessed).context("reading the preprocessed source")?);
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

    let options =
        RemoteStoreOptions { instance: instance.to_owned(), timeout: Duration::from_secs(120), ..Default::default() };
    let store = tokio::time::timeout(Duration::from_secs(5), RemoteStore::connect(remote, options))
        .await
        .map_err(|_| anyhow::anyhow!("{remote} did not answer within 5 s"))?
        .with_context(|| format!("connecting to {remote}"))?;
    blobs.extend(action.blobs.iter().cloned());
    store.upload_missing(blobs, &Default::default()).await.context("uploading the action")?;
    let response = execute(&store, instance, &action.digest, function).await?;
    let status = response.status.clone().unwrap_or_default();
    if status.code != 0 {
        return Err(anyhow::anyhow!("the cluster could not run it: {}", status.message).into());
    }
    let result = response.result.context("the cluster sent no result")?;
    let parse =
        |d: &Option<casbuild_proto::reapi::Digest>| d.as_ref().and_then(|d| Digest::from_proto(function, d).ok());
    for (digest, to_stdout) in [(parse(&result.stdout_digest), true), (parse(&result.stderr_digest), false)] {
        if let Some(digest) = digest.filter(|d| !d.is_empty_blob()) {
            let bytes = store.read_all(&digest).await.context("fetching the compiler's messages")?;
            let _ = if to_stdout {
                std::io::Write::write_all(&mut std::io::stdout(), &bytes)
            } else {
                // The compiler's own messages, without the worker's report on failures.
                let suffix = report_suffix(&response.message);
                let own = bytes.strip_suffix(suffix.as_bytes()).unwrap_or(&bytes);
                std::io::Write::write_all(&mut std::io::stderr(), own)
            };
        }
    }
    if result.exit_code != 0 {
        return Ok(result.exit_code);
    }
    let object = result
        .output_files
        .iter()
        .find(|f| f.path == "output.o")
        .and_then(|f| parse(&f.digest))
        .context("the compile succeeded but produced no object file")?;
    let bytes = store.read_all(&object).await.context("fetching the object file")?;
    let dest = Path::new(&compile.output);
    let temporary = dest.with_extension("o.casbuild-tmp");
    std::fs::write(&temporary, &bytes).with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, dest).with_context(|| format!("writing {}", dest.display()))?;
    Ok(0)
}

/// Executes `action` (or finds it cached) and returns the final response.
async fn execute(
    store: &RemoteStore,
    instance: &str,
    action: &Digest,
    function: DigestFunction,
) -> anyhow::Result<ExecuteResponse> {
    let mut client = ExecutionClient::new(store.channel());
    let request = ExecuteRequest {
        instance_name: instance.to_owned(),
        action_digest: Some(action.to_proto()),
        digest_function: function.to_proto() as i32,
        ..Default::default()
    };
    let mut stream = client.execute(request).await.context("Execute")?.into_inner();
    while let Some(operation) = stream.message().await.context("Execute")? {
        if !operation.done {
            continue;
        }
        return match operation.result {
            Some(operation::Result::Response(any)) => {
                Ok(ExecuteResponse::decode(any.value.as_slice()).context("a bad ExecuteResponse")?)
            }
            Some(operation::Result::Error(status)) => anyhow::bail!("the operation failed: {}", status.message),
            None => anyhow::bail!("the operation finished without a result"),
        };
    }
    anyhow::bail!("the Execute stream ended before the operation finished")
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

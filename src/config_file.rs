//! Config files of the serving roles. `casbuild ROLE` reads `--config FILE`,
//! else `$XDG_CONFIG_HOME/casbuild/ROLE.toml` (`~/.config/...`), else
//! `/etc/casbuild/ROLE.toml`. Every top-level key names one of the role's
//! flags (`cache_size = "20GiB"` is `--cache-size 20GiB`, a list repeats a
//! repeatable flag), so the file can hold exactly what the command line can
//! and is checked by the same parsers. The command line and environment win
//! over the file, the file over the defaults. Tables are the role's own
//! (the coordinator's `[auth]`, `[limits]` and `[object_store]`), read by the role itself.
//! (A switch the file turns on cannot be turned off by a flag: switches
//! have no `--no-` form.)

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context};
use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Command};

/// The roles that read a config file, with the tables each reads itself.
const ROLES: &[(&str, &[&str])] =
    &[("up", &[]), ("coordinator", &["auth", "limits", "object_store"]), ("worker", &[]), ("daemon", &[])];

/// Flags no file may set.
const NOT_FROM_FILE: &[&str] = &["config", "help", "version"];

/// Parses `args` against `command`; for a serving role, parses again with
/// its config file's settings added as flags. A bad command line exits
/// with clap's message; a bad file is an error naming the file.
pub fn matches(mut command: Command, mut args: Vec<OsString>) -> anyhow::Result<ArgMatches> {
    command.build();
    let first = command.clone().try_get_matches_from(&args).unwrap_or_else(|e| e.exit());
    let Some((role, given)) = first.subcommand() else { return Ok(first) };
    let Some(&(_, tables)) = ROLES.iter().find(|(name, _)| *name == role) else { return Ok(first) };
    let explicit = given.get_one::<PathBuf>("config").cloned();
    let Some(path) = explicit.clone().or_else(|| discover(role)) else { return Ok(first) };
    let leaf = command.find_subcommand(role).expect("a parsed subcommand exists");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading config {}", path.display()))?;
    let flags = file_flags(&text, role, leaf, given, tables).map_err(|e| anyhow!("config {}: {e}", path.display()))?;
    if explicit.is_none() {
        // The role learns where its settings came from (the coordinator
        // re-reads [auth] from it on SIGHUP).
        args.extend([OsString::from("--config"), path.clone().into_os_string()]);
    }
    args.extend(flags);
    command.try_get_matches_from(&args).map_err(|e| {
        let rendered = e.render().to_string();
        let message = rendered.trim_start_matches("error: ").lines().next().unwrap_or_default().to_owned();
        anyhow!("config {}: {message}", path.display())
    })
}

/// The first of `$XDG_CONFIG_HOME/casbuild/ROLE.toml` and
/// `/etc/casbuild/ROLE.toml` that exists.
fn discover(role: &str) -> Option<PathBuf> {
    let user = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".config")));
    let file = format!("{role}.toml");
    user.map(|dir| dir.join("casbuild").join(&file))
        .into_iter()
        .chain([Path::new("/etc/casbuild").join(&file)])
        .find(|path| path.exists())
}

/// The flags a file's keys stand for, leaving out those the command line or
/// the environment already set.
fn file_flags(
    text: &str,
    role: &str,
    command: &Command,
    given: &ArgMatches,
    tables: &[&str],
) -> anyhow::Result<Vec<OsString>> {
    let table: toml::Table = text.parse()?;
    let mut flags = Vec::new();
    for (key, value) in &table {
        if value.is_table() {
            ensure!(tables.contains(&key.as_str()), "`casbuild {role}` reads no [{key}] table");
            continue;
        }
        let name = key.replace('-', "_");
        let arg = command
            .get_arguments()
            .filter(|arg| arg.get_long().is_some() && !NOT_FROM_FILE.contains(&arg.get_id().as_str()))
            .find(|arg| {
                arg.get_long().is_some_and(|long| long.replace('-', "_") == name) || arg.get_id().as_str() == name
            })
            .ok_or_else(|| {
                anyhow!("unknown setting `{key}`: `casbuild {role}` has no --{} flag", name.replace('_', "-"))
            })?;
        if matches!(
            given.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let long = arg.get_long().expect("found by its long name");
        match arg.get_action() {
            ArgAction::SetTrue => match value {
                toml::Value::Boolean(true) => flags.push(format!("--{long}").into()),
                toml::Value::Boolean(false) => {}
                _ => bail!("`{key}` is true or false"),
            },
            ArgAction::Append => {
                let values = match value {
                    toml::Value::Array(items) => items.iter().collect(),
                    one => vec![one],
                };
                for value in values {
                    flags.push(format!("--{long}={}", scalar(key, value)?).into());
                }
            }
            _ => flags.push(format!("--{long}={}", scalar(key, value)?).into()),
        }
    }
    Ok(flags)
}

/// A single value as its command-line text.
fn scalar(key: &str, value: &toml::Value) -> anyhow::Result<String> {
    Ok(match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(n) => n.to_string(),
        toml::Value::Float(n) => n.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        _ => bail!("`{key}` takes one string, number or true/false"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in role with the kinds of flags the real ones have.
    fn command() -> Command {
        use clap::Arg;
        let role = Command::new("worker")
            .arg(Arg::new("config").long("config").value_parser(clap::value_parser!(PathBuf)))
            .arg(Arg::new("cache_size").long("cache-size").default_value("20GiB"))
            .arg(Arg::new("slots").long("slots").env("TEST_CONFIG_FILE_SLOTS").value_parser(clap::value_parser!(u32)))
            .arg(Arg::new("no_cgroups").long("no-cgroups").action(ArgAction::SetTrue))
            .arg(Arg::new("platform").long("platform").action(ArgAction::Append));
        Command::new("casbuild").subcommand(role).subcommand(Command::new("cas"))
    }

    fn with_file(text: &str, args: &[&str]) -> anyhow::Result<ArgMatches> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker.toml");
        std::fs::write(&path, text).unwrap();
        let mut argv: Vec<OsString> = ["casbuild", "worker", "--config"].map(OsString::from).into();
        argv.push(path.into_os_string());
        argv.extend(args.iter().map(OsString::from));
        matches(command(), argv).map(|m| m.subcommand_matches("worker").unwrap().clone())
    }

    #[test]
    fn file_settings_fill_what_flags_leave_unset() {
        let file =
            "cache-size = \"2GiB\"\nslots = 3\nno_cgroups = true\nplatform = [\"OSFamily=linux\", \"arch=x86\"]\n";
        let m = with_file(file, &[]).unwrap();
        assert_eq!(m.get_one::<String>("cache_size").unwrap(), "2GiB");
        assert_eq!(m.get_one::<u32>("slots"), Some(&3));
        assert!(m.get_flag("no_cgroups"));
        let platform: Vec<&String> = m.get_many("platform").unwrap().collect();
        assert_eq!(platform, ["OSFamily=linux", "arch=x86"]);

        // Flags win, a list included (the file's list is not added to it).
        let m = with_file(file, &["--slots", "5", "--platform", "a=b"]).unwrap();
        assert_eq!(m.get_one::<u32>("slots"), Some(&5));
        assert_eq!(m.get_many::<String>("platform").unwrap().collect::<Vec<_>>(), ["a=b"]);
    }

    #[test]
    fn bad_files_name_the_file_and_the_setting() {
        let err = with_file("cache_sise = 1\n", &[]).unwrap_err().to_string();
        assert!(err.contains("worker.toml") && err.contains("cache_sise") && err.contains("--cache-sise"), "{err}");
        let err = with_file("slots = \"many\"\n", &[]).unwrap_err().to_string();
        assert!(err.contains("worker.toml") && err.contains("many") && err.contains("--slots"), "{err}");
        let err = with_file("no_cgroups = \"yes\"\n", &[]).unwrap_err().to_string();
        assert!(err.contains("true or false"), "{err}");
        let err = with_file("[auth]\n", &[]).unwrap_err().to_string();
        assert!(err.contains("no [auth] table"), "{err}");
        let err = with_file("config = \"/elsewhere\"\n", &[]).unwrap_err().to_string();
        assert!(err.contains("unknown setting `config`"), "{err}");
        let err = with_file("slots = [1, 2]\n", &[]).unwrap_err().to_string();
        assert!(err.contains("one string"), "{err}");
        let err = with_file("slots = \n", &[]).unwrap_err().to_string();
        assert!(err.contains("worker.toml"), "{err}");
    }

    #[test]
    fn other_subcommands_read_no_file() {
        let m = matches(command(), ["casbuild", "cas"].map(OsString::from).into()).unwrap();
        assert!(m.subcommand_matches("cas").is_some());
    }
}

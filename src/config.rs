//! Configuration shared by the subcommands: where data lives by default, byte
//! sizes on the command line, and the per-role TOML file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use bytesize::ByteSize;

/// Parses a size such as `20GiB`, `512MiB` or `1000000` (bytes).
pub fn parse_size(text: &str) -> Result<u64, String> {
    text.parse::<ByteSize>().map(|s| s.as_u64()).map_err(|e| format!("{text:?} is not a size like 20GiB: {e}"))
}

/// `250ms`, `90s`, `30m`, `2h` or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration like 500ms, 90s, 30m or 2h");
    let (number, unit) =
        text.trim().split_at(text.trim().find(|c: char| !c.is_ascii_digit()).unwrap_or(text.trim().len()));
    let n: u64 = number.parse().map_err(|_| bad())?;
    let scale = |factor: u64| n.checked_mul(factor).map(Duration::from_secs).ok_or_else(bad);
    match unit.trim() {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => scale(1),
        "m" => scale(60),
        "h" => scale(3600),
        _ => Err(bad()),
    }
}

/// `$XDG_CACHE_HOME/casbuild`, else `~/.cache/casbuild`.
pub fn default_data_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("casbuild")
}

/// Where a coordinator keeps its state unless told: `/var/lib/casbuild` for
/// root, else `$XDG_DATA_HOME/casbuild` (`~/.local/share/casbuild`). Never
/// inside [`default_data_dir`], where `casbuild up` mounts its `/cas`.
pub fn default_state_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/casbuild");
    }
    std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("/var/lib"))
        .join("casbuild")
}

/// A secret from a flag or from a file (its first line), so that it need
/// not show in `ps`.
pub fn secret(value: Option<String>, file: Option<&Path>) -> anyhow::Result<Option<String>> {
    match (value, file) {
        (Some(_), Some(path)) => anyhow::bail!("give the value or the file {}, not both", path.display()),
        (value, None) => Ok(value.filter(|v| !v.is_empty())),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            let token = text.lines().next().unwrap_or_default().trim().to_owned();
            anyhow::ensure!(!token.is_empty(), "{} is empty: its first line should hold the secret", path.display());
            Ok(Some(token))
        }
    }
}

/// Reads a TOML config file into `T`, naming the file in any error.
pub fn load_toml<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("config {}", path.display()))
}

/// A size as written in a config file: a string like "20GiB" or a number of bytes.
#[derive(Clone, Copy, Debug, serde::Deserialize)]
#[serde(untagged)]
pub enum ConfigSize {
    /// A plain number of bytes.
    Bytes(u64),
    /// A string with a unit.
    Text(#[serde(deserialize_with = "size_text")] u64),
}

impl ConfigSize {
    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        match self {
            ConfigSize::Bytes(n) | ConfigSize::Text(n) => n,
        }
    }
}

fn size_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let text: String = serde::Deserialize::deserialize(d)?;
    parse_size(&text).map_err(serde::de::Error::custom)
}

/// A duration as written in a config table: "90s", "15m", or a number of seconds.
#[derive(Clone, Copy, Debug, serde::Deserialize)]
#[serde(untagged)]
pub enum ConfigDuration {
    /// A plain number of seconds.
    Seconds(u64),
    /// A string with a unit.
    Text(#[serde(deserialize_with = "duration_text")] Duration),
}

impl ConfigDuration {
    /// The duration.
    pub fn get(self) -> Duration {
        match self {
            ConfigDuration::Seconds(n) => Duration::from_secs(n),
            ConfigDuration::Text(d) => d,
        }
    }
}

fn duration_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text: String = serde::Deserialize::deserialize(d)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_clear_errors() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("15"), Ok(Duration::from_secs(15)));
        assert!(parse_duration("1d").unwrap_err().contains("like 500ms"));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
    }
}

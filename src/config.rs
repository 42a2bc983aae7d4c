//! Configuration shared by the subcommands: where data lives by default, byte
//! sizes on the command line, and the per-role TOML file.

use std::path::{Path, PathBuf};

use anyhow::Context;
use bytesize::ByteSize;

/// Parses a size such as `20GiB`, `512MiB` or `1000000` (bytes).
pub fn parse_size(text: &str) -> Result<u64, String> {
    text.parse::<ByteSize>().map(|s| s.as_u64()).map_err(|e| format!("{text:?} is not a size like 20GiB: {e}"))
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

//! ByteStream resource names, as REAPI defines them:
//!
//! ```text
//! {instance}/blobs/{function/}{hash}/{size}
//! {instance}/compressed-blobs/{compressor}/{function/}{hash}/{size}
//! {instance}/uploads/{uuid}/blobs/{function/}{hash}/{size}{/metadata}
//! {instance}/uploads/{uuid}/compressed-blobs/{compressor}/{function/}{hash}/{size}{/metadata}
//! ```
//!
//! The instance name may span several segments; it ends at the first reserved
//! keyword. The function segment is present for BLAKE3 and omitted for
//! SHA-256, which is inferred from the 64-digit hash.

use std::fmt;

use crate::digest::{Digest, DigestError, DigestFunction};
use crate::error::Invalid;

/// Segments that cannot be part of an instance name.
const RESERVED: [&str; 7] =
    ["blobs", "uploads", "actions", "actionResults", "operations", "capabilities", "compressed-blobs"];

/// Longest instance name accepted.
pub const MAX_INSTANCE_NAME: usize = 255;

/// Checks an instance name: at most [`MAX_INSTANCE_NAME`] bytes of
/// `/`-separated segments, each non-empty, made of `A-Z a-z 0-9 . _ -`, not
/// `.` or `..`, and not a word REAPI reserves in resource names. Each
/// instance gets state of its own on a server, so names are not free-form.
pub fn check_instance_name(name: &str) -> Result<(), Invalid> {
    if name.is_empty() {
        return Ok(());
    }
    if name.len() > MAX_INSTANCE_NAME {
        return Err(Invalid(format!("instance name of {} bytes is over the limit of {MAX_INSTANCE_NAME}", name.len())));
    }
    for segment in name.split('/') {
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if segment.is_empty() || segment == "." || segment == ".." || !segment.chars().all(allowed) {
            return Err(Invalid(format!(
                "instance name {name:?}: segment {segment:?} must be non-empty, not . or .., and use only A-Z a-z 0-9 . _ -"
            )));
        }
        if RESERVED.contains(&segment) {
            return Err(Invalid(format!("instance name {name:?}: {segment:?} is reserved")));
        }
    }
    Ok(())
}

/// How the bytes of a ByteStream transfer are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compressor {
    /// Plain bytes.
    Identity,
    /// A zstd frame (or concatenated frames) of the blob.
    Zstd,
}

/// A parsed ByteStream resource name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceName {
    /// The instance (namespace) the blob lives in; may contain slashes.
    pub instance: String,
    /// The client's upload id, for write resource names only.
    pub upload_id: Option<String>,
    /// Encoding of the transferred bytes.
    pub compressor: Compressor,
    /// The (uncompressed) blob's digest.
    pub digest: Digest,
}

impl ResourceName {
    /// Parses a `ByteStream.Read` resource name.
    pub fn parse_read(name: &str) -> Result<Self, DigestError> {
        let parsed = Self::parse(name)?;
        if parsed.upload_id.is_some() {
            return Err(malformed(name, "a read resource name cannot contain uploads/"));
        }
        Ok(parsed)
    }

    /// Parses a `ByteStream.Write` resource name.
    pub fn parse_write(name: &str) -> Result<Self, DigestError> {
        let parsed = Self::parse(name)?;
        if parsed.upload_id.is_none() {
            return Err(malformed(name, "a write resource name needs uploads/{uuid}/"));
        }
        Ok(parsed)
    }

    fn parse(name: &str) -> Result<Self, DigestError> {
        let segments: Vec<&str> = name.split('/').collect();
        let start = segments
            .iter()
            .position(|s| RESERVED.contains(s))
            .ok_or_else(|| malformed(name, "expected blobs/, compressed-blobs/ or uploads/"))?;
        let instance = segments[..start].join("/");
        if segments[..start].iter().any(|s| s.is_empty()) {
            return Err(malformed(name, "the instance name has an empty segment"));
        }
        check_instance_name(&instance).map_err(|e| malformed(name, &e.0))?;
        let mut rest = &segments[start..];
        let mut upload_id = None;
        if rest[0] == "uploads" {
            let id = rest.get(1).filter(|s| !s.is_empty() && !RESERVED.contains(s));
            upload_id = Some(id.ok_or_else(|| malformed(name, "uploads/ must be followed by an id"))?.to_string());
            rest = &rest[2..];
        }
        let compressor = match rest.first() {
            Some(&"blobs") => {
                rest = &rest[1..];
                Compressor::Identity
            }
            Some(&"compressed-blobs") => {
                let compressor = match rest.get(1) {
                    Some(&"zstd") => Compressor::Zstd,
                    Some(other) => {
                        return Err(malformed(name, &format!("compressor {other:?} is not supported (only zstd)")))
                    }
                    None => return Err(malformed(name, "compressed-blobs/ needs a compressor")),
                };
                rest = &rest[2..];
                compressor
            }
            _ => return Err(malformed(name, "expected blobs/ or compressed-blobs/")),
        };
        let function = match rest.first() {
            // Function names (sha256, blake3, md5, ...) all have a non-hex letter.
            Some(seg) if !seg.chars().all(|c| c.is_ascii_hexdigit()) => {
                let function = seg.parse::<DigestFunction>().map_err(|e| malformed(name, &e.to_string()))?;
                rest = &rest[1..];
                Some(function)
            }
            _ => None,
        };
        let (hash, size) = match rest {
            [hash, size, ..] => (*hash, *size),
            _ => return Err(malformed(name, "expected {hash}/{size}")),
        };
        let function = match function {
            Some(f) => f,
            None => DigestFunction::resolve(0, hash).map_err(|e| malformed(name, &e.to_string()))?,
        };
        let size: i64 = size.parse().map_err(|_| malformed(name, &format!("size {size:?} is not a number")))?;
        let digest = Digest::from_hex(function, hash, size).map_err(|e| malformed(name, &e.to_string()))?;
        Ok(ResourceName { instance, upload_id, compressor, digest })
    }

    /// A read resource name for `digest`.
    pub fn read(instance: &str, compressor: Compressor, digest: Digest) -> Self {
        ResourceName { instance: instance.to_string(), upload_id: None, compressor, digest }
    }

    /// A write resource name for `digest` with a fresh upload id.
    pub fn write(instance: &str, compressor: Compressor, digest: Digest) -> Self {
        ResourceName {
            instance: instance.to_string(),
            upload_id: Some(uuid::Uuid::new_v4().to_string()),
            compressor,
            digest,
        }
    }
}

impl fmt::Display for ResourceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.instance.is_empty() {
            write!(f, "{}/", self.instance)?;
        }
        if let Some(id) = &self.upload_id {
            write!(f, "uploads/{id}/")?;
        }
        match self.compressor {
            Compressor::Identity => f.write_str("blobs/")?,
            Compressor::Zstd => f.write_str("compressed-blobs/zstd/")?,
        }
        if self.digest.function != DigestFunction::Sha256 {
            write!(f, "{}/", self.digest.function)?;
        }
        write!(f, "{}/{}", self.digest.hash_hex(), self.digest.size_bytes)
    }
}

fn malformed(name: &str, why: &str) -> DigestError {
    DigestError::Malformed(format!("resource name {name:?}: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha() -> Digest {
        DigestFunction::Sha256.digest_of(b"hello")
    }
    fn b3() -> Digest {
        DigestFunction::Blake3.digest_of(b"hello")
    }

    #[test]
    fn every_form_round_trips() {
        for instance in ["", "main", "team/a/b"] {
            for compressor in [Compressor::Identity, Compressor::Zstd] {
                for digest in [sha(), b3()] {
                    let read = ResourceName::read(instance, compressor, digest);
                    assert_eq!(ResourceName::parse_read(&read.to_string()).unwrap(), read);
                    let write = ResourceName::write(instance, compressor, digest);
                    assert_eq!(ResourceName::parse_write(&write.to_string()).unwrap(), write);
                }
            }
        }
    }

    #[test]
    fn sha256_named_explicitly_and_metadata_are_accepted() {
        let d = sha();
        let name = format!("x/uploads/u1/blobs/sha256/{}/5/some/metadata", d.hash_hex());
        let parsed = ResourceName::parse_write(&name).unwrap();
        assert_eq!(parsed.digest, d);
        assert_eq!(parsed.instance, "x");
    }

    #[test]
    fn instance_names_are_short_path_like_and_plain() {
        for good in ["", "main", "team/a-b/c_d.1"] {
            assert!(check_instance_name(good).is_ok(), "{good:?}");
        }
        let long = "x".repeat(MAX_INSTANCE_NAME + 1);
        for bad in [long.as_str(), "a//b", "/a", "a/", "a/../b", "a b", "ä", "team/blobs", "a\0"] {
            assert!(check_instance_name(bad).is_err(), "{bad:?}");
        }
        let h = sha().hash_hex();
        assert!(ResourceName::parse_read(&format!("a b/blobs/{h}/3")).is_err());
    }

    #[test]
    fn malformed_names_are_rejected_with_the_reason() {
        let h = sha().hash_hex();
        let cases = [
            (format!("blobs/{h}"), "expected {hash}/{size}"),
            (format!("blobs/{h}/-1"), "negative"),
            (format!("blobs/{h}/ten"), "not a number"),
            ("blobs/abc/5".to_string(), "no supported function"),
            (format!("blobs/md5/{h}/5"), "unknown digest function"),
            (format!("compressed-blobs/brotli/{h}/5"), "not supported"),
            (format!("inst/{h}/5"), "expected blobs/"),
            (format!("a//blobs/{h}/5"), "empty segment"),
            (format!("uploads/u/blobs/{h}/5"), "cannot contain uploads"),
        ];
        for (name, want) in cases {
            let err = ResourceName::parse_read(&name).unwrap_err().to_string();
            assert!(err.contains(want), "{name}: {err}");
        }
        let err = ResourceName::parse_write(&format!("blobs/{h}/5")).unwrap_err().to_string();
        assert!(err.contains("needs uploads"), "{err}");
    }

    #[test]
    fn blake3_hash_without_function_is_read_as_sha256() {
        let name = format!("blobs/{}/5", b3().hash_hex());
        assert_eq!(ResourceName::parse_read(&name).unwrap().digest.function, DigestFunction::Sha256);
    }
}

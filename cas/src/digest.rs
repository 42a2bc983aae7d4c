//! Content digests: which function, the hash, the size — and how they travel
//! on the wire (REAPI `Digest` protos and `HASH/SIZE` strings).
//!
//! Both supported functions produce 32-byte hashes, so a [`Digest`] is a small
//! `Copy` value that can key maps without allocation.

use std::fmt;
use std::str::FromStr;

use casbuild_proto::reapi;
use casbuild_proto::reapi::digest_function::Value as ProtoFunction;
use sha2::Digest as _;

/// The hash functions casbuild stores blobs under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum DigestFunction {
    /// BLAKE3: the default for casbuild's own clients (fast, parallel).
    #[default]
    Blake3,
    /// SHA-256: what Bazel and most REAPI clients use.
    Sha256,
}

impl DigestFunction {
    /// Every supported function, in the order capabilities announce them.
    pub const ALL: [DigestFunction; 2] = [DigestFunction::Sha256, DigestFunction::Blake3];

    /// The lowercase name used in resource names and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            DigestFunction::Blake3 => "blake3",
            DigestFunction::Sha256 => "sha256",
        }
    }

    /// The REAPI `DigestFunction.Value` for this function.
    pub fn to_proto(self) -> ProtoFunction {
        match self {
            DigestFunction::Blake3 => ProtoFunction::Blake3,
            DigestFunction::Sha256 => ProtoFunction::Sha256,
        }
    }

    /// Resolves the function of a request: its `digest_function` field when set,
    /// otherwise inferred from the hash length as REAPI asks (64 hex digits mean
    /// SHA-256 — BLAKE3 must always be named explicitly).
    pub fn resolve(requested: i32, hash_hex: &str) -> Result<Self, DigestError> {
        match ProtoFunction::try_from(requested) {
            Ok(ProtoFunction::Unknown) => match hash_hex.len() {
                64 => Ok(DigestFunction::Sha256),
                n => Err(DigestError::UnknownFunction(format!(
                    "no digest_function given and a {n}-digit hash names no supported function"
                ))),
            },
            Ok(ProtoFunction::Sha256) => Ok(DigestFunction::Sha256),
            Ok(ProtoFunction::Blake3) => Ok(DigestFunction::Blake3),
            Ok(other) => Err(DigestError::UnknownFunction(format!(
                "digest function {} is not supported (use sha256 or blake3)",
                other.as_str_name().to_lowercase()
            ))),
            Err(_) => Err(DigestError::UnknownFunction(format!(
                "digest_function {requested} is not a known DigestFunction value"
            ))),
        }
    }

    /// Starts a streaming hash.
    pub fn hasher(self) -> Hasher {
        let state = match self {
            DigestFunction::Blake3 => HashState::Blake3(Box::new(blake3::Hasher::new())),
            DigestFunction::Sha256 => HashState::Sha256(sha2::Sha256::new()),
        };
        Hasher { state, count: 0 }
    }

    /// Digest of `data` in one call.
    pub fn digest_of(self, data: &[u8]) -> Digest {
        let mut hasher = self.hasher();
        hasher.update(data);
        hasher.finish()
    }

    /// The digest of the empty blob, which every store holds implicitly.
    pub fn empty(self) -> Digest {
        self.digest_of(&[])
    }
}

impl FromStr for DigestFunction {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, DigestError> {
        match s {
            "blake3" => Ok(DigestFunction::Blake3),
            "sha256" => Ok(DigestFunction::Sha256),
            other => {
                Err(DigestError::UnknownFunction(format!("unknown digest function {other:?} (use sha256 or blake3)")))
            }
        }
    }
}

impl fmt::Display for DigestFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A streaming hasher for either function; [`Hasher::finish`] yields the digest
/// including the number of bytes fed.
pub struct Hasher {
    state: HashState,
    count: u64,
}

enum HashState {
    // Boxed: BLAKE3's state is almost 2 KiB.
    Blake3(Box<blake3::Hasher>),
    Sha256(sha2::Sha256),
}

impl Hasher {
    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.count += data.len() as u64;
        match &mut self.state {
            HashState::Blake3(h) => {
                h.update(data);
            }
            HashState::Sha256(h) => h.update(data),
        }
    }

    /// Bytes fed so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Finishes the hash.
    pub fn finish(self) -> Digest {
        let (function, hash) = match self.state {
            HashState::Blake3(h) => (DigestFunction::Blake3, *h.finalize().as_bytes()),
            HashState::Sha256(h) => (DigestFunction::Sha256, h.finalize().into()),
        };
        Digest { function, hash, size_bytes: self.count }
    }
}

/// A content digest. Store keys are exactly this triple.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    /// The function that produced `hash`.
    pub function: DigestFunction,
    /// The raw 32-byte hash.
    pub hash: [u8; 32],
    /// The blob's size in bytes.
    pub size_bytes: u64,
}

impl Digest {
    /// Parses a lowercase-hex hash and a size, as found in protos and resource names.
    pub fn from_hex(function: DigestFunction, hash_hex: &str, size: i64) -> Result<Self, DigestError> {
        if hash_hex.len() != 64 {
            return Err(DigestError::Malformed(format!(
                "{function} hash {hash_hex:?} must be 64 hex digits, not {}",
                hash_hex.len()
            )));
        }
        let hash = decode_hash(hash_hex.as_bytes())
            .ok_or_else(|| DigestError::Malformed(format!("hash {hash_hex:?} is not lowercase hex")))?;
        let size_bytes = u64::try_from(size)
            .map_err(|_| DigestError::Malformed(format!("size {size} of {hash_hex} is negative")))?;
        Ok(Digest { function, hash, size_bytes })
    }

    /// Converts a REAPI `Digest` under a known function.
    pub fn from_proto(function: DigestFunction, proto: &reapi::Digest) -> Result<Self, DigestError> {
        Self::from_hex(function, &proto.hash, proto.size_bytes)
    }

    /// Converts a REAPI `Digest`, resolving the function from the request's
    /// `digest_function` field (see [`DigestFunction::resolve`]).
    pub fn from_request(requested: i32, proto: &reapi::Digest) -> Result<Self, DigestError> {
        let function = DigestFunction::resolve(requested, &proto.hash)?;
        Self::from_proto(function, proto)
    }

    /// The REAPI `Digest` proto (the function travels separately on the wire).
    pub fn to_proto(&self) -> reapi::Digest {
        reapi::Digest { hash: self.hash_hex(), size_bytes: self.size_bytes as i64 }
    }

    /// The hash as lowercase hex.
    pub fn hash_hex(&self) -> String {
        let mut text = String::with_capacity(64);
        for byte in self.hash {
            text.push(HEX_DIGITS[(byte >> 4) as usize] as char);
            text.push(HEX_DIGITS[(byte & 0xf) as usize] as char);
        }
        text
    }

    /// Parses `HASH/SIZE` (the form the CLI prints) under `function`.
    pub fn parse(function: DigestFunction, text: &str) -> Result<Self, DigestError> {
        let (hash, size) = text
            .split_once('/')
            .or_else(|| text.split_once('-'))
            .ok_or_else(|| DigestError::Malformed(format!("digest {text:?} is not HASH/SIZE")))?;
        let size: i64 =
            size.parse().map_err(|_| DigestError::Malformed(format!("size in digest {text:?} is not a number")))?;
        Self::from_hex(function, hash, size)
    }

    /// Whether this is the digest of the empty blob.
    pub fn is_empty_blob(&self) -> bool {
        self.size_bytes == 0 && *self == self.function.empty()
    }
}

impl fmt::Display for Digest {
    /// `HASH/SIZE`, the form clients paste into commands.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.hash_hex(), self.size_bytes)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.function, self)
    }
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Value of each byte as a lowercase hex digit, or 0xff. Digest parsing sits
/// on the FindMissingBlobs hot path (10,000 digests a call), where a general
/// hex decoder cost ~0.3 µs a digest; this table costs a few ns.
const HEX_VALUES: [u8; 256] = {
    let mut table = [0xffu8; 256];
    let mut i = 0;
    while i < 16 {
        table[HEX_DIGITS[i] as usize] = i as u8;
        i += 1;
    }
    table
};

/// Decodes 64 lowercase hex digits into a hash.
fn decode_hash(text: &[u8]) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut hash = [0u8; 32];
    for (byte, pair) in hash.iter_mut().zip(text.chunks_exact(2)) {
        let (hi, lo) = (HEX_VALUES[pair[0] as usize], HEX_VALUES[pair[1] as usize]);
        if (hi | lo) == 0xff {
            return None;
        }
        *byte = (hi << 4) | lo;
    }
    Some(hash)
}

/// Why a digest or digest function could not be accepted.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DigestError {
    /// The digest function is missing, unknown or unsupported.
    #[error("{0}")]
    UnknownFunction(String),
    /// The hash or size is not well formed.
    #[error("{0}")]
    Malformed(String),
}

/// How messages list a set of digests: the first ten, and how many more
/// (`a/1, b/2, ... and 15 more`).
pub fn some_digests(digests: &[Digest]) -> String {
    let listed: Vec<String> = digests.iter().take(10).map(|d| d.to_string()).collect();
    match digests.len() - listed.len() {
        0 => listed.join(", "),
        more => format!("{} and {more} more", listed.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        assert_eq!(
            DigestFunction::Sha256.empty().hash_hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            DigestFunction::Blake3.digest_of(b"").hash_hex(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        let d = DigestFunction::Sha256.digest_of(b"abc");
        assert_eq!(d.size_bytes, 3);
        assert_eq!(Digest::parse(DigestFunction::Sha256, &d.to_string()).unwrap(), d);
    }

    #[test]
    fn hex_parsing_is_strict() {
        let good = "0123456789abcdef".repeat(4);
        assert!(Digest::from_hex(DigestFunction::Sha256, &good, 1).is_ok());
        for bad in [good.to_uppercase(), good.replace('a', "g"), good[..62].to_string(), format!("{good}00")] {
            assert!(Digest::from_hex(DigestFunction::Sha256, &bad, 1).is_err(), "{bad}");
        }
        assert!(Digest::from_hex(DigestFunction::Sha256, &good, -1).is_err());
    }

    #[test]
    fn function_resolution_follows_the_spec() {
        let h64 = "a".repeat(64);
        assert_eq!(DigestFunction::resolve(0, &h64).unwrap(), DigestFunction::Sha256);
        assert_eq!(DigestFunction::resolve(ProtoFunction::Blake3 as i32, &h64).unwrap(), DigestFunction::Blake3);
        assert!(DigestFunction::resolve(0, &"a".repeat(40)).is_err());
        assert!(DigestFunction::resolve(ProtoFunction::Md5 as i32, &h64).is_err());
        assert!(DigestFunction::resolve(1000, &h64).is_err());
    }

    #[test]
    fn streaming_and_one_shot_hashes_agree() {
        for function in DigestFunction::ALL {
            let mut hasher = function.hasher();
            hasher.update(b"hello ");
            hasher.update(b"world");
            assert_eq!(hasher.finish(), function.digest_of(b"hello world"));
        }
    }
}

//! Checking bytes against the digest they claim to have.

use bytes::Bytes;
use futures::StreamExt;

use crate::digest::{Digest, Hasher};
use crate::store::{BlobStream, StoreError};

/// Hashes bytes as they arrive and checks them against an expected digest:
/// an overrun fails at once, a short or wrong blob fails at [`Verifier::finish`].
pub struct Verifier {
    expected: Digest,
    hasher: Hasher,
}

impl Verifier {
    /// Starts verifying a blob that should have digest `expected`.
    pub fn new(expected: Digest) -> Self {
        Verifier { expected, hasher: expected.function.hasher() }
    }

    /// Feeds the next bytes.
    pub fn update(&mut self, data: &[u8]) -> Result<(), StoreError> {
        let total = self.hasher.count() + data.len() as u64;
        if total > self.expected.size_bytes {
            return Err(StoreError::InvalidArgument(format!(
                "blob {:?}: received {total} bytes, more than its size {}",
                self.expected, self.expected.size_bytes
            )));
        }
        self.hasher.update(data);
        Ok(())
    }

    /// Bytes fed so far.
    pub fn count(&self) -> u64 {
        self.hasher.count()
    }

    /// Checks the size and hash of everything fed.
    pub fn finish(self) -> Result<(), StoreError> {
        let expected = self.expected;
        let count = self.hasher.count();
        if count != expected.size_bytes {
            return Err(StoreError::InvalidArgument(format!(
                "blob {expected:?}: received {count} bytes, it ended before its size {}",
                expected.size_bytes
            )));
        }
        let actual = self.hasher.finish();
        if actual != expected {
            return Err(StoreError::DigestMismatch(format!(
                "blob {expected:?}: content hashes to {}, not to its digest",
                actual.hash_hex()
            )));
        }
        Ok(())
    }

    /// Verifies a whole blob in one call.
    pub fn check(expected: Digest, data: &[u8]) -> Result<(), StoreError> {
        let mut verifier = Verifier::new(expected);
        verifier.update(data)?;
        verifier.finish()
    }
}

/// Wraps a stream of a whole blob so that its consumer never receives all of a
/// blob that does not match `digest`: each chunk is hashed as it passes, the
/// last one is held back until the hash is checked, and a mismatch (or a wrong
/// length) ends the stream with the error `on_corrupt` returns instead.
pub fn verified<F>(stream: BlobStream, digest: Digest, on_corrupt: F) -> BlobStream
where
    F: FnOnce() -> StoreError + Send + 'static,
{
    struct State<F> {
        inner: BlobStream,
        verifier: Option<Verifier>,
        held: Option<Bytes>,
        on_corrupt: Option<F>,
    }
    let state =
        State { inner: stream, verifier: Some(Verifier::new(digest)), held: None, on_corrupt: Some(on_corrupt) };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            let verifier = st.verifier.as_mut()?;
            match st.inner.next().await {
                Some(Ok(chunk)) => {
                    if verifier.update(&chunk).is_err() {
                        st.verifier = None;
                        return Some((Err((st.on_corrupt.take()?)()), st));
                    }
                    if let Some(prev) = st.held.replace(chunk) {
                        return Some((Ok(prev), st));
                    }
                }
                Some(Err(e)) => {
                    st.verifier = None;
                    return Some((Err(e), st));
                }
                None => {
                    let ok = st.verifier.take()?.finish().is_ok();
                    return match (ok, st.held.take()) {
                        (true, Some(last)) => Some((Ok(last), st)),
                        (true, None) => None,
                        (false, _) => Some((Err((st.on_corrupt.take()?)()), st)),
                    };
                }
            }
        }
    })
    .boxed()
}

//! A large blob streaming into the disk cache while readers already use it.
//!
//! A cold open of a large file does not wait for the whole blob: one
//! ByteStream read streams it, front to back, into its cache file (a
//! [`DiskStore::begin_followed_write`]), and every read is answered as soon as
//! its range has arrived. A read far ahead of the stream (a seek into the
//! middle of a large file) does not wait for the stream either: it is served
//! by a ranged ByteStream read of the aligned window around it.
//!
//! The whole blob is verified when the stream completes, and only then does
//! it count as present in the cache; if it does not match, the partial file
//! is dropped and every later read of this download fails (EIO). Bytes served
//! before that were not verified yet: [`Download::finished`] lets whoever
//! used them (the runner, before it accepts an action's result) wait for the
//! verdict.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use casbuild_cas::digest::Digest;
use casbuild_cas::store::{BlobWriter, Flights, SharedStore, StoreError};
use futures::StreamExt;
use tokio::sync::watch;

/// A read this far (or farther) ahead of the stream is served by a ranged
/// read instead of waiting for the stream to get there.
pub const AHEAD: u64 = 8 << 20;

/// Ranged reads fetch this aligned window around the requested bytes.
pub const WINDOW: u64 = 1 << 20;

/// Windows kept in memory per download.
const WINDOWS_KEPT: usize = 16;

/// How far the stream has come.
#[derive(Clone, Debug)]
enum Progress {
    /// This many bytes from the start are in the file.
    Arrived(u64),
    /// Every byte arrived and the blob matched its digest.
    Verified,
    /// The stream failed or the blob did not match.
    Failed(String),
}

/// One blob streaming into the cache; shared by every open of it.
pub struct Download {
    digest: Digest,
    /// A read handle on the file being written.
    file: File,
    progress: watch::Receiver<Progress>,
    source: SharedStore,
    /// Recently fetched windows, by their start offset.
    windows: Mutex<VecDeque<(u64, Bytes)>>,
    window_reads: Flights<u64, Bytes>,
    ranged: AtomicU64,
}

impl Download {
    /// Streams `digest` from `source` into `writer` (whose file `file` reads),
    /// in a task of its own that runs to the end whoever still reads; `done`
    /// is called with the outcome once the blob is verified and committed
    /// (or has failed).
    pub fn start(
        digest: Digest,
        writer: Box<dyn BlobWriter>,
        file: File,
        source: SharedStore,
        done: impl FnOnce(&Result<(), StoreError>) + Send + 'static,
    ) -> Arc<Self> {
        let (tx, progress) = watch::channel(Progress::Arrived(0));
        let download = Arc::new(Download {
            digest,
            file,
            progress,
            source: source.clone(),
            windows: Mutex::new(VecDeque::new()),
            window_reads: Flights::default(),
            ranged: AtomicU64::new(0),
        });
        tokio::spawn(async move {
            let outcome = stream_into(&source, &digest, writer, &tx).await;
            done(&outcome);
            let last = match outcome {
                Ok(()) => Progress::Verified,
                Err(e) => Progress::Failed(format!("fetching {digest}: {e}")),
            };
            tx.send_replace(last);
        });
        download
    }

    /// The blob being fetched.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// How many ranged reads served reads ahead of the stream.
    pub fn ranged_reads(&self) -> u64 {
        self.ranged.load(Ordering::Relaxed)
    }

    /// Up to `size` bytes at `offset` (fewer only at the end of the blob), as
    /// soon as they are there. Called on a FUSE thread (inside `block_on`):
    /// the file reads here are plain blocking `pread`s.
    pub async fn read(&self, offset: u64, size: u32) -> Result<Bytes, String> {
        let total = self.digest.size_bytes;
        let end = offset.saturating_add(u64::from(size)).min(total);
        if offset >= end {
            return Ok(Bytes::new());
        }
        let mut progress = self.progress.clone();
        loop {
            let state = progress.borrow_and_update().clone();
            match state {
                Progress::Failed(why) => return Err(why),
                Progress::Verified => return self.read_file(offset, end),
                Progress::Arrived(arrived) if arrived >= end => return self.read_file(offset, end),
                Progress::Arrived(arrived) if offset >= arrived.saturating_add(AHEAD) => {
                    return self.read_ahead(offset, end).await
                }
                Progress::Arrived(_) => {}
            }
            if progress.changed().await.is_err() {
                // The task says how it ended before it stops; if it was
                // dropped instead (the runtime shutting down), nothing more
                // will arrive.
                return match &*progress.borrow() {
                    Progress::Failed(why) => Err(why.clone()),
                    Progress::Verified => self.read_file(offset, end),
                    Progress::Arrived(arrived) if *arrived >= end => self.read_file(offset, end),
                    Progress::Arrived(_) => Err(format!("the fetch of {} stopped", self.digest)),
                };
            }
        }
    }

    /// Waits until the blob is verified (`Ok`) or has failed.
    pub async fn finished(&self) -> Result<(), String> {
        let mut progress = self.progress.clone();
        loop {
            match &*progress.borrow_and_update() {
                Progress::Verified => return Ok(()),
                Progress::Failed(why) => return Err(why.clone()),
                Progress::Arrived(_) => {}
            }
            if progress.changed().await.is_err() {
                return Err(format!("the fetch of {} stopped", self.digest));
            }
        }
    }

    fn read_file(&self, offset: u64, end: u64) -> Result<Bytes, String> {
        let mut buf = vec![0; (end - offset) as usize];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(|e| format!("reading the cache file of {}: {e}", self.digest))?;
        Ok(Bytes::from(buf))
    }

    /// The bytes `offset..end`, from the windows fetched around them.
    async fn read_ahead(&self, offset: u64, end: u64) -> Result<Bytes, String> {
        let mut out = BytesMut::with_capacity((end - offset) as usize);
        let mut at = offset;
        while at < end {
            let start = at - at % WINDOW;
            let window = self.window(start).await?;
            let upto = end.min(start + window.len() as u64);
            out.extend_from_slice(&window[(at - start) as usize..(upto - start) as usize]);
            at = upto;
        }
        Ok(out.freeze())
    }

    /// The window starting at `start`, fetched once however many readers want it.
    async fn window(&self, start: u64) -> Result<Bytes, String> {
        let kept = self.windows.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|(s, _)| *s == start).cloned();
        if let Some((_, bytes)) = kept {
            return Ok(bytes);
        }
        let len = WINDOW.min(self.digest.size_bytes - start);
        let (source, digest) = (self.source.clone(), self.digest);
        self.ranged.fetch_add(1, Ordering::Relaxed);
        let fetched = self
            .window_reads
            .run(start, async move {
                let mut stream = source.read(&digest, start, Some(len)).await?;
                let mut bytes = BytesMut::with_capacity(len as usize);
                while let Some(chunk) = stream.next().await {
                    bytes.extend_from_slice(&chunk?);
                    if bytes.len() as u64 > len {
                        break;
                    }
                }
                if bytes.len() as u64 != len {
                    return Err(StoreError::Unavailable(format!(
                        "the CAS sent {} bytes for the {len} bytes at {start} of {digest}",
                        bytes.len()
                    )));
                }
                Ok(bytes.freeze())
            })
            .await
            .map_err(|e| format!("a ranged read of {}: {e}", self.digest))?;
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if windows.len() == WINDOWS_KEPT {
            windows.pop_front();
        }
        windows.push_back((start, fetched.clone()));
        Ok(fetched)
    }
}

/// Copies the blob from `source` into `writer`, telling how far it got.
async fn stream_into(
    source: &SharedStore,
    digest: &Digest,
    mut writer: Box<dyn BlobWriter>,
    progress: &watch::Sender<Progress>,
) -> Result<(), StoreError> {
    let mut stream = source.read(digest, 0, None).await?;
    while let Some(chunk) = stream.next().await {
        writer.write(chunk?).await?;
        progress.send_replace(Progress::Arrived(writer.written()));
    }
    writer.commit().await
}

#[cfg(test)]
mod tests {
    use async_trait::async_trait;
    use casbuild_cas::digest::DigestFunction;
    use casbuild_cas::store::{BlobStore, BlobStream, DiskStore, MemoryStore};
    use std::time::Duration;
    use tokio::sync::mpsc;

    use tokio_stream::wrappers::UnboundedReceiverStream;

    use super::*;

    /// A CAS whose whole-blob read sends exactly the chunks the test feeds;
    /// ranged reads come from memory at once.
    struct Fed {
        blobs: MemoryStore,
        chunks: Mutex<Option<mpsc::UnboundedReceiver<Result<Bytes, StoreError>>>>,
    }

    #[async_trait]
    impl BlobStore for Fed {
        async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError> {
            self.blobs.find_missing(digests).await
        }

        async fn read(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> Result<BlobStream, StoreError> {
            if offset == 0 && limit.is_none() {
                let rx = self.chunks.lock().unwrap().take().expect("one whole read");
                return Ok(UnboundedReceiverStream::new(rx).boxed());
            }
            self.blobs.read(digest, offset, limit).await
        }

        async fn begin_write(&self, digest: &Digest) -> Result<Box<dyn BlobWriter>, StoreError> {
            self.blobs.begin_write(digest).await
        }
    }

    async fn fixture(
        data: &Bytes,
    ) -> (tempfile::TempDir, DiskStore, Digest, Arc<Fed>, mpsc::UnboundedSender<Result<Bytes, StoreError>>) {
        let digest = DigestFunction::Blake3.digest_of(data);
        let (tx, rx) = mpsc::unbounded_channel();
        let fed = Arc::new(Fed { blobs: MemoryStore::new(1 << 30), chunks: Mutex::new(Some(rx)) });
        fed.blobs.write(&digest, data.clone()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let local = DiskStore::open(dir.path(), 1 << 30).unwrap();
        (dir, local, digest, fed, tx)
    }

    fn data(len: usize) -> Bytes {
        (0..len).map(|i| (i % 253) as u8).collect::<Vec<u8>>().into()
    }

    #[tokio::test]
    async fn reads_wait_for_their_range_far_ones_are_ranged_and_the_blob_is_cached_once_verified() {
        let blob = data(20 << 20);
        let (_dir, local, digest, fed, tx) = fixture(&blob).await;
        let (writer, file) = local.begin_followed_write(&digest).await.unwrap();
        let download = Download::start(digest, writer, file, fed, |_| {});

        let first = tokio::spawn({
            let download = download.clone();
            async move { download.read(0, 4096).await }
        });
        tokio::task::yield_now().await;
        assert!(!first.is_finished(), "nothing has arrived yet");
        tx.send(Ok(blob.slice(..1 << 20))).unwrap();
        assert_eq!(first.await.unwrap().unwrap(), blob.slice(..4096));

        // 15 MiB is far ahead of the stream: a ranged read, at once.
        let far = download.read(15 << 20, 100_000).await.unwrap();
        assert_eq!(far, blob.slice(15 << 20..(15 << 20) + 100_000));
        assert_eq!(download.ranged_reads(), 1);
        assert!(local.find_missing(&[digest]).await.unwrap() == vec![digest], "not cached before it is whole");

        for start in (1 << 20..blob.len()).step_by(1 << 20) {
            tx.send(Ok(blob.slice(start..blob.len().min(start + (1 << 20))))).unwrap();
        }
        drop(tx);
        download.finished().await.unwrap();
        assert_eq!(download.read(blob.len() as u64 - 1, 10).await.unwrap(), blob.slice(blob.len() - 1..));
        assert!(local.find_missing(&[digest]).await.unwrap().is_empty(), "cached once verified");
    }

    #[tokio::test]
    async fn a_blob_that_does_not_match_fails_every_later_read_and_is_not_cached() {
        let blob = data(10 << 20);
        let (_dir, local, digest, fed, tx) = fixture(&blob).await;
        let (writer, file) = local.begin_followed_write(&digest).await.unwrap();
        let download = Download::start(digest, writer, file, fed, |_| {});
        let mut lie = blob.to_vec();
        lie[5] ^= 1;
        tx.send(Ok(Bytes::from(lie))).unwrap();
        drop(tx);
        assert!(download.finished().await.is_err());
        assert!(download.read(0, 10).await.is_err(), "no read after the verdict");
        assert_eq!(local.find_missing(&[digest]).await.unwrap(), vec![digest]);
    }

    #[test]
    fn a_reader_of_a_fetch_whose_task_was_dropped_gets_an_error() {
        let blob = data(10 << 20);
        let main = tokio::runtime::Runtime::new().unwrap();
        let (_dir, local, digest, fed, tx) = main.block_on(fixture(&blob));
        let other = tokio::runtime::Runtime::new().unwrap();
        let download = other.block_on(async {
            let (writer, file) = local.begin_followed_write(&digest).await.unwrap();
            Download::start(digest, writer, file, fed, |_| {})
        });
        drop(other); // drops the fetch task mid-stream
        drop(tx);
        let read = main.block_on(async { tokio::time::timeout(Duration::from_secs(10), download.read(0, 10)).await });
        assert!(read.expect("the read returns").is_err());
    }
}

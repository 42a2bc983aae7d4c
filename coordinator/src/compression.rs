//! zstd for ByteStream and batch transfers: whole-buffer helpers for batches,
//! and a bounded streaming decoder for uploads.

use bytes::Bytes;
use tonic::Status;
use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};

/// Output produced per decoder step: bounds memory whatever the input's ratio.
const DECODE_STEP: usize = 1 << 20;

/// Compresses a whole buffer (fast level: transfers, not archives).
pub fn compress(data: &[u8]) -> Result<Vec<u8>, Status> {
    zstd::bulk::compress(data, 1).map_err(|e| Status::internal(format!("zstd compression failed: {e}")))
}

/// Decompresses a whole buffer that must expand to exactly `size` bytes.
pub fn decompress_exact(data: &[u8], size: u64) -> Result<Bytes, Status> {
    let out = zstd::bulk::decompress(data, size as usize)
        .map_err(|e| Status::invalid_argument(format!("zstd data does not decompress to {size} bytes: {e}")))?;
    if out.len() as u64 != size {
        return Err(Status::invalid_argument(format!("zstd data decompresses to {} bytes, not {size}", out.len())));
    }
    Ok(out.into())
}

/// A streaming zstd decoder fed compressed chunks in order.
pub struct StreamDecoder {
    decoder: Decoder<'static>,
}

impl StreamDecoder {
    /// A decoder at the start of a stream.
    pub fn new() -> Result<Self, Status> {
        let decoder = Decoder::new().map_err(|e| Status::internal(format!("zstd decoder: {e}")))?;
        Ok(StreamDecoder { decoder })
    }

    /// Decodes from `input` (advancing it) until up to 1 MiB of output is
    /// ready, and returns that output; `None` once `input` is used up and
    /// nothing more is pending. Call in a loop, writing each piece as it comes,
    /// so a decompression bomb is stopped by the size check of the writer
    /// rather than by running out of memory.
    pub fn step(&mut self, input: &mut &[u8]) -> Result<Option<Bytes>, Status> {
        loop {
            let mut out = vec![0u8; DECODE_STEP];
            let mut out_buf = OutBuffer::around(&mut out);
            let mut in_buf = InBuffer::around(input);
            self.decoder
                .run(&mut in_buf, &mut out_buf)
                .map_err(|e| Status::invalid_argument(format!("upload is not valid zstd data: {e}")))?;
            let (read, written) = (in_buf.pos(), out_buf.pos());
            *input = &input[read..];
            if written > 0 {
                out.truncate(written);
                return Ok(Some(out.into()));
            }
            if input.is_empty() {
                return Ok(None);
            }
        }
    }
}

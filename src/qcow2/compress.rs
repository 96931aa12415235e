//! Compressed clusters: raw deflate ("zlib" in QEMU) and zstd.

use crate::error::{Error, Result};
use crate::format::CompressionType;

/// Compresses one cluster for storage as a compressed cluster: raw deflate with a 4 KiB
/// window (what QEMU's decompressor accepts) or a zstd frame. `None` when compression
/// would not make the cluster smaller, so it should be written uncompressed.
pub fn compress_cluster(kind: CompressionType, data: &[u8]) -> Result<Option<Vec<u8>>> {
    let fail = |reason: String| Error::Decompress {
        host_offset: 0,
        reason,
    };
    let out = match kind {
        CompressionType::Zlib => {
            let mut c =
                flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12);
            let mut out = Vec::with_capacity(data.len());
            let status = c
                .compress_vec(data, &mut out, flate2::FlushCompress::Finish)
                .map_err(|e| fail(format!("deflate: {e}")))?;
            if status != flate2::Status::StreamEnd {
                return Ok(None); // did not fit in a cluster's worth of output
            }
            out
        }
        CompressionType::Zstd => {
            zstd::bulk::compress(data, 0).map_err(|e| fail(format!("zstd: {e}")))?
        }
    };
    // As QEMU decides: any saving counts. Compressed clusters are packed byte by byte, so
    // even one that saves less than a sector saves space (with 512-byte clusters none
    // could save a whole sector, and QEMU still compresses them).
    Ok((out.len() < data.len()).then_some(out))
}

/// Decompresses `input` into exactly `out.len()` bytes (one cluster). Trailing input past
/// the end of the stream is ignored: the last sector is shared with the next cluster.
pub(crate) fn decompress(
    kind: CompressionType,
    input: &[u8],
    out: &mut [u8],
    host_offset: u64,
) -> Result<()> {
    let fail = |reason: String| Error::Decompress {
        host_offset,
        reason,
    };
    match kind {
        CompressionType::Zlib => {
            let mut d = flate2::Decompress::new(false);
            let status = d
                .decompress(input, out, flate2::FlushDecompress::Finish)
                .map_err(|e| fail(format!("deflate: {e}")))?;
            if d.total_out() != out.len() as u64 {
                return Err(fail(format!(
                    "deflate stream produced {} of {} bytes ({status:?})",
                    d.total_out(),
                    out.len()
                )));
            }
        }
        CompressionType::Zstd => {
            use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
            let mut d = Decoder::new().map_err(|e| fail(format!("zstd: {e}")))?;
            let mut inb = InBuffer::around(input);
            let mut outb = OutBuffer::around(out);
            loop {
                let hint = d
                    .run(&mut inb, &mut outb)
                    .map_err(|e| fail(format!("zstd: {e}")))?;
                if outb.pos() == outb.capacity() || hint == 0 {
                    break;
                }
                if inb.pos() == input.len() {
                    break;
                }
            }
            let produced = outb.pos();
            if produced != out.len() {
                return Err(fail(format!(
                    "zstd stream produced {produced} of {} bytes",
                    out.len()
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn raw_deflate_with_trailing_garbage_decompresses() {
        let data = vec![7u8; 4096];
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&data).unwrap();
        let mut compressed = enc.finish().unwrap();
        compressed.extend_from_slice(&[0xff; 100]);
        let mut out = vec![0u8; 4096];
        decompress(CompressionType::Zlib, &compressed, &mut out, 0).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn zstd_frame_decompresses_and_short_output_is_an_error() {
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let compressed = zstd::bulk::compress(&data, 1).unwrap();
        let mut out = vec![0u8; 8192];
        decompress(CompressionType::Zstd, &compressed, &mut out, 0).unwrap();
        assert_eq!(out, data);
        let mut bigger = vec![0u8; 16384];
        assert!(decompress(CompressionType::Zstd, &compressed, &mut bigger, 0).is_err());
    }

    #[test]
    fn compressed_clusters_round_trip_and_incompressible_ones_are_refused() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 100) as u8).collect();
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let c = compress_cluster(kind, &data).unwrap().unwrap();
            let mut out = vec![0u8; data.len()];
            decompress(kind, &c, &mut out, 0).unwrap();
            assert_eq!(out, data);
            let mut x = 0x2545_f491_4f6c_dd1du64;
            let noise: Vec<u8> = (0..4096)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 32) as u8
                })
                .collect();
            assert_eq!(compress_cluster(kind, &noise).unwrap(), None);
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut out = vec![0u8; 512];
        assert!(decompress(CompressionType::Zlib, &[0xff; 64], &mut out, 0).is_err());
        assert!(decompress(CompressionType::Zstd, &[0xff; 64], &mut out, 0).is_err());
    }
}

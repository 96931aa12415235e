//! The `nbd` fuzz target: arbitrary bytes as a client's whole conversation with the NBD
//! server (negotiation, then requests), over a small chain in memory.

use std::sync::Arc;

use crate::chain::Chain;
use crate::create::{CreateOptions, create_on};
use crate::layers::{Format, Layer};
use crate::nbd::codec::{
    Command, MetaContextRequest, OptionRequest, Request, command_flags, handshake_flags, info,
};
use crate::nbd::{ExportOptions, NbdServer};
use crate::qcow2::{Image, ImageOptions};
use crate::storage::MemStorage;

/// The served image's size.
pub const NBD_IMAGE_SIZE: u64 = 1 << 20;

/// The export: an image with data, zero clusters and a dirty bitmap; read-only when
/// the first input byte is odd (the bitmap is then offered; a writable export cannot
/// offer an enabled one).
fn server(read_only: bool) -> NbdServer {
    let storage = Arc::new(MemStorage::new());
    let options = CreateOptions {
        format: Format::Qcow2,
        size: Some(NBD_IMAGE_SIZE),
        cluster_size: 4096,
        ..CreateOptions::default()
    };
    create_on(&*storage, &options).expect("creating the fuzz image");
    let writable = ImageOptions {
        writable: true,
        ..ImageOptions::default()
    };
    let image = Image::from_storage(Box::new(storage.clone()), "nbd.qcow2", &writable, None)
        .expect("opening the fuzz image");
    image.add_bitmap("b", None, true).expect("adding a bitmap");
    let chain = Chain::from_layers(vec![Layer::Qcow2(image)]).expect("a chain");
    chain.write_at(&[0x5a; 12288], 4096).expect("writing");
    chain.write_zeroes(65536, 65536, false).expect("zeroing");
    let chain = if read_only {
        chain.close().expect("closing");
        drop(chain);
        let image = Image::from_storage(
            Box::new(storage),
            "nbd.qcow2",
            &ImageOptions::default(),
            None,
        )
        .expect("reopening");
        Chain::from_layers(vec![Layer::Qcow2(image)]).expect("a chain")
    } else {
        chain
    };
    let options = ExportOptions {
        name: String::new(),
        description: "fuzz".into(),
        read_only,
        allocation_depth: true,
        bitmaps: if read_only { vec!["b".into()] } else { vec![] },
        discard: true,
        max_connections: 1,
        persistent: false,
        workers: 0,
    };
    NbdServer::new(Arc::new(chain), options).expect("a server")
}

/// Serves the conversation `data[1..]` (the first byte picks a read-only export when
/// odd). Must not panic; what the server sends is bounded by what the client asked.
pub fn nbd(data: &[u8]) {
    let Some((&first, conversation)) = data.split_first() else {
        return;
    };
    let server = server(first & 1 == 1);
    let out = server.serve_bytes(conversation);
    // Each request (28 bytes at least) is answered by at most the image's size of data
    // plus headers and a few contexts' extents; each option by a few KiB.
    let units = conversation.len() as u64 / 16 + 1;
    let bound = units * (NBD_IMAGE_SIZE + (64 << 10));
    assert!(
        (out.len() as u64) <= bound,
        "{} bytes out for {} in",
        out.len(),
        conversation.len()
    );
}

/// Conversations real clients have, as fuzzing seeds: (name, bytes with the first byte
/// choosing the export).
pub fn nbd_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let flags = handshake_flags::C_FIXED_NEWSTYLE | handshake_flags::C_NO_ZEROES;
    let request = |out: &mut Vec<u8>, command, flags, offset, length| {
        Request {
            flags,
            command,
            cookie: out.len() as u64,
            offset,
            length,
        }
        .encode(out)
    };
    let structured_go = |out: &mut Vec<u8>| {
        out.extend_from_slice(&flags.to_be_bytes());
        OptionRequest::StructuredReply.encode(out);
        OptionRequest::ListMetaContext(MetaContextRequest {
            export: String::new(),
            queries: vec![],
        })
        .encode(out);
        OptionRequest::SetMetaContext(MetaContextRequest {
            export: String::new(),
            queries: vec!["base:allocation".into(), "qemu:".into()],
        })
        .encode(out);
        OptionRequest::Go {
            name: String::new(),
            requests: vec![info::BLOCK_SIZE, info::NAME, info::DESCRIPTION],
        }
        .encode(out);
    };
    let mut seeds = Vec::new();

    // qemu-img map / nbdinfo --map: block status over everything, then reads.
    let mut a = vec![1u8];
    structured_go(&mut a);
    request(&mut a, Command::BlockStatus, 0, 0, NBD_IMAGE_SIZE as u32);
    request(
        &mut a,
        Command::BlockStatus,
        command_flags::REQ_ONE,
        8192,
        65536,
    );
    request(&mut a, Command::Read, 0, 0, 65536);
    request(&mut a, Command::Read, command_flags::DF, 4096, 512);
    request(&mut a, Command::Cache, 0, 0, 8192);
    request(&mut a, Command::Disconnect, 0, 0, 0);
    seeds.push(("seed-map-read", a));

    // qemu-io writes: write, FUA write, zeroes, trim, flush.
    let mut w = vec![0u8];
    structured_go(&mut w);
    request(&mut w, Command::Write, 0, 512, 1024);
    w.extend_from_slice(&[0x33; 1024]);
    request(&mut w, Command::Write, command_flags::FUA, 200_000, 100);
    w.extend_from_slice(&[0x44; 100]);
    request(
        &mut w,
        Command::WriteZeroes,
        command_flags::NO_HOLE,
        4096,
        8192,
    );
    request(
        &mut w,
        Command::WriteZeroes,
        command_flags::FAST_ZERO,
        0,
        4096,
    );
    request(&mut w, Command::Trim, 0, 16384, 16384);
    request(&mut w, Command::Flush, 0, 0, 0);
    request(&mut w, Command::BlockStatus, 0, 0, 65536);
    request(&mut w, Command::Read, 0, 0, 32768);
    request(&mut w, Command::Disconnect, 0, 0, 0);
    seeds.push(("seed-writes", w));

    // An old client: NBD_OPT_EXPORT_NAME with the zeroes, simple replies.
    let mut o = vec![0u8];
    o.extend_from_slice(&handshake_flags::C_FIXED_NEWSTYLE.to_be_bytes());
    OptionRequest::List.encode(&mut o);
    OptionRequest::Info {
        name: String::new(),
        requests: vec![],
    }
    .encode(&mut o);
    OptionRequest::Unknown(99).encode(&mut o);
    OptionRequest::ExportName(String::new()).encode(&mut o);
    request(&mut o, Command::Read, 0, 4096, 4096);
    request(&mut o, Command::Write, 0, 0, 16);
    o.extend_from_slice(&[1; 16]);
    request(&mut o, Command::Other(42), 0, 0, 0);
    request(&mut o, Command::Read, 0, NBD_IMAGE_SIZE, 1);
    seeds.push(("seed-export-name", o));

    // A client that asks, then aborts.
    let mut x = vec![1u8];
    x.extend_from_slice(&flags.to_be_bytes());
    OptionRequest::Go {
        name: "nosuch".into(),
        requests: vec![],
    }
    .encode(&mut x);
    OptionRequest::SetMetaContext(MetaContextRequest {
        export: String::new(),
        queries: vec!["qemu:dirty-bitmap:b".into()],
    })
    .encode(&mut x);
    OptionRequest::Abort.encode(&mut x);
    seeds.push(("seed-abort", x));
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_get_answers() {
        for (name, seed) in nbd_seeds() {
            let server = server(seed[0] & 1 == 1);
            let out = server.serve_bytes(&seed[1..]);
            assert!(out.len() > 18, "{name}: {} bytes", out.len());
            nbd(&seed);
        }
    }
}

//! The NBD protocol's messages as a pure codec (the NetworkBlockDevice project's
//! `doc/proto.md`): bytes in, typed values out, and back. No I/O: every decoder takes
//! `&[u8]` and returns a value or a [`ProtocolError`] naming what was wrong; every encoder
//! appends to a `Vec<u8>`. All integers are big-endian, as on the wire.
//!
//! `handshake.rs`: the greeting, client flags, option requests and option replies.
//! `transmission.rs`: requests, simple replies and structured reply chunks.

mod handshake;
mod transmission;

pub use handshake::{
    ExportNameReply, Greeting, InfoItem, MetaContextRequest, OptionHeader, OptionReply,
    OptionReplyBody, OptionRequest,
};
pub use transmission::{Chunk, ChunkBody, Command, Request, SimpleReply, StatusExtent};

/// `NBDMAGIC`: the first eight bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The magic of every request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// The magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Longest name, description or metadata context query accepted (QEMU's
/// `NBD_MAX_STRING_SIZE`).
pub const MAX_STRING: usize = 4096;

/// Handshake flags (server) and client flags.
pub mod handshake_flags {
    /// `NBD_FLAG_FIXED_NEWSTYLE`.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// `NBD_FLAG_NO_ZEROES`: the 124 zero bytes after `NBD_OPT_EXPORT_NAME` may go.
    pub const NO_ZEROES: u16 = 1 << 1;
    /// `NBD_FLAG_C_FIXED_NEWSTYLE`.
    pub const C_FIXED_NEWSTYLE: u32 = 1 << 0;
    /// `NBD_FLAG_C_NO_ZEROES`.
    pub const C_NO_ZEROES: u32 = 1 << 1;
}

/// Transmission flags: what an export supports.
pub mod transmission_flags {
    /// `NBD_FLAG_HAS_FLAGS`: always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// `NBD_FLAG_READ_ONLY`.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_FLAG_SEND_FLUSH`.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_FLAG_SEND_FUA`.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_FLAG_ROTATIONAL`.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_FLAG_SEND_TRIM`.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_FLAG_SEND_WRITE_ZEROES`.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_FLAG_SEND_DF`.
    pub const SEND_DF: u16 = 1 << 7;
    /// `NBD_FLAG_CAN_MULTI_CONN`: a flush on one connection covers writes of all.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_FLAG_SEND_RESIZE`.
    pub const SEND_RESIZE: u16 = 1 << 9;
    /// `NBD_FLAG_SEND_CACHE`.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_FLAG_SEND_FAST_ZERO`.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option numbers (`NBD_OPT_*`).
pub mod option {
    /// `NBD_OPT_EXPORT_NAME`.
    pub const EXPORT_NAME: u32 = 1;
    /// `NBD_OPT_ABORT`.
    pub const ABORT: u32 = 2;
    /// `NBD_OPT_LIST`.
    pub const LIST: u32 = 3;
    /// `NBD_OPT_STARTTLS`.
    pub const STARTTLS: u32 = 5;
    /// `NBD_OPT_INFO`.
    pub const INFO: u32 = 6;
    /// `NBD_OPT_GO`.
    pub const GO: u32 = 7;
    /// `NBD_OPT_STRUCTURED_REPLY`.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// `NBD_OPT_LIST_META_CONTEXT`.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// `NBD_OPT_SET_META_CONTEXT`.
    pub const SET_META_CONTEXT: u32 = 10;
    /// `NBD_OPT_EXTENDED_HEADERS`.
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (`NBD_REP_*`); errors have bit 31 set.
pub mod reply {
    /// `NBD_REP_ACK`.
    pub const ACK: u32 = 1;
    /// `NBD_REP_SERVER`.
    pub const SERVER: u32 = 2;
    /// `NBD_REP_INFO`.
    pub const INFO: u32 = 3;
    /// `NBD_REP_META_CONTEXT`.
    pub const META_CONTEXT: u32 = 4;
    /// `NBD_REP_ERR_UNSUP`.
    pub const ERR_UNSUP: u32 = (1 << 31) + 1;
    /// `NBD_REP_ERR_POLICY`.
    pub const ERR_POLICY: u32 = (1 << 31) + 2;
    /// `NBD_REP_ERR_INVALID`.
    pub const ERR_INVALID: u32 = (1 << 31) + 3;
    /// `NBD_REP_ERR_PLATFORM`.
    pub const ERR_PLATFORM: u32 = (1 << 31) + 4;
    /// `NBD_REP_ERR_TLS_REQD`.
    pub const ERR_TLS_REQD: u32 = (1 << 31) + 5;
    /// `NBD_REP_ERR_UNKNOWN`: no such export.
    pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
    /// `NBD_REP_ERR_SHUTDOWN`.
    pub const ERR_SHUTDOWN: u32 = (1 << 31) + 7;
    /// `NBD_REP_ERR_TOO_BIG`.
    pub const ERR_TOO_BIG: u32 = (1 << 31) + 9;
}

/// Info types (`NBD_INFO_*`) of `NBD_OPT_INFO` and `NBD_OPT_GO`.
pub mod info {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// `NBD_INFO_NAME`.
    pub const NAME: u16 = 1;
    /// `NBD_INFO_DESCRIPTION`.
    pub const DESCRIPTION: u16 = 2;
    /// `NBD_INFO_BLOCK_SIZE`.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command flags (`NBD_CMD_FLAG_*`).
pub mod command_flags {
    /// `NBD_CMD_FLAG_FUA`: durable before the reply.
    pub const FUA: u16 = 1 << 0;
    /// `NBD_CMD_FLAG_NO_HOLE`: write zeroes without punching holes.
    pub const NO_HOLE: u16 = 1 << 1;
    /// `NBD_CMD_FLAG_DF`: a read's reply in one chunk.
    pub const DF: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_REQ_ONE`: one extent per context.
    pub const REQ_ONE: u16 = 1 << 3;
    /// `NBD_CMD_FLAG_FAST_ZERO`: fail rather than write zeroes slowly.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// Every flag this codec knows.
    pub const KNOWN: u16 = FUA | NO_HOLE | DF | REQ_ONE | FAST_ZERO;
}

/// Structured reply chunk flags and types.
pub mod chunk {
    /// `NBD_REPLY_FLAG_DONE`: the last chunk of a reply.
    pub const FLAG_DONE: u16 = 1 << 0;
    /// `NBD_REPLY_TYPE_NONE`.
    pub const NONE: u16 = 0;
    /// `NBD_REPLY_TYPE_OFFSET_DATA`.
    pub const OFFSET_DATA: u16 = 1;
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`.
    pub const OFFSET_HOLE: u16 = 2;
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`.
    pub const BLOCK_STATUS: u16 = 5;
    /// `NBD_REPLY_TYPE_ERROR`.
    pub const ERROR: u16 = (1 << 15) + 1;
    /// `NBD_REPLY_TYPE_ERROR_OFFSET`.
    pub const ERROR_OFFSET: u16 = (1 << 15) + 2;
}

/// The errno values the protocol carries (`NBD_E*`).
pub mod errno {
    /// `NBD_EPERM`.
    pub const EPERM: u32 = 1;
    /// `NBD_EIO`.
    pub const EIO: u32 = 5;
    /// `NBD_ENOMEM`.
    pub const ENOMEM: u32 = 12;
    /// `NBD_EINVAL`.
    pub const EINVAL: u32 = 22;
    /// `NBD_ENOSPC`.
    pub const ENOSPC: u32 = 28;
    /// `NBD_EOVERFLOW`.
    pub const EOVERFLOW: u32 = 75;
    /// `NBD_ENOTSUP`.
    pub const ENOTSUP: u32 = 95;
    /// `NBD_ESHUTDOWN`.
    pub const ESHUTDOWN: u32 = 108;
}

/// Block status flags of the metadata contexts.
pub mod status {
    /// `base:allocation`: `NBD_STATE_HOLE`.
    pub const HOLE: u32 = 1 << 0;
    /// `base:allocation`: `NBD_STATE_ZERO`.
    pub const ZERO: u32 = 1 << 1;
    /// `qemu:dirty-bitmap:NAME`: `NBD_STATE_DIRTY`.
    pub const DIRTY: u32 = 1 << 0;
}

/// What is wrong with bytes that should be a protocol message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// Fewer bytes than the message needs.
    #[error("{what}: {got} bytes, {need} needed")]
    Truncated {
        /// The message or field.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes there were.
        got: usize,
    },
    /// A magic number is not the protocol's.
    #[error("{what}: bad magic {found:#x}")]
    BadMagic {
        /// The message.
        what: &'static str,
        /// The value found.
        found: u64,
    },
    /// Bytes left over after a message whose length says where it ends.
    #[error("{what}: {extra} bytes past its end")]
    TrailingBytes {
        /// The message.
        what: &'static str,
        /// How many.
        extra: usize,
    },
    /// A string longer than [`MAX_STRING`].
    #[error("{what}: {len} bytes, at most {MAX_STRING}")]
    StringTooLong {
        /// The field.
        what: &'static str,
        /// Its length.
        len: usize,
    },
    /// A string that is not UTF-8.
    #[error("{what}: not UTF-8")]
    NotUtf8 {
        /// The field.
        what: &'static str,
    },
    /// A value the message cannot have.
    #[error("{what}: invalid value {value:#x}")]
    Invalid {
        /// The field.
        what: &'static str,
        /// The value found.
        value: u64,
    },
}

/// A cursor over untrusted bytes: every read checks the length first.
pub(crate) struct Bytes<'a> {
    data: &'a [u8],
    at: usize,
    what: &'static str,
}

impl<'a> Bytes<'a> {
    pub(crate) fn new(data: &'a [u8], what: &'static str) -> Bytes<'a> {
        Bytes { data, at: 0, what }
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        let rest = &self.data[self.at..];
        if rest.len() < n {
            return Err(ProtocolError::Truncated {
                what: self.what,
                need: self.at + n,
                got: self.data.len(),
            });
        }
        self.at += n;
        Ok(&rest[..n])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, ProtocolError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, ProtocolError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, ProtocolError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A string of `len` bytes, at most [`MAX_STRING`], UTF-8.
    pub(crate) fn string(
        &mut self,
        len: usize,
        what: &'static str,
    ) -> Result<String, ProtocolError> {
        if len > MAX_STRING {
            return Err(ProtocolError::StringTooLong { what, len });
        }
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| ProtocolError::NotUtf8 { what })
    }

    /// A string preceded by its u32 length.
    pub(crate) fn string32(&mut self, what: &'static str) -> Result<String, ProtocolError> {
        let len = self.u32()? as usize;
        self.string(len, what)
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        let rest = &self.data[self.at..];
        self.at = self.data.len();
        rest
    }

    pub(crate) fn remaining(&self) -> usize {
        self.data.len() - self.at
    }

    /// Fails unless every byte was read.
    pub(crate) fn end(&self) -> Result<(), ProtocolError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(ProtocolError::TrailingBytes {
                what: self.what,
                extra,
            }),
        }
    }
}

/// Appends a string preceded by its u32 length.
pub(crate) fn put_string32(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

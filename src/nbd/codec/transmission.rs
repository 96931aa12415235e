//! Transmission: requests, simple replies and structured reply chunks.

use super::{
    Bytes, ProtocolError, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, chunk,
};

/// A request's command (`NBD_CMD_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ` (0).
    Read,
    /// `NBD_CMD_WRITE` (1): `length` bytes of data follow the request.
    Write,
    /// `NBD_CMD_DISC` (2): the client is leaving.
    Disconnect,
    /// `NBD_CMD_FLUSH` (3).
    Flush,
    /// `NBD_CMD_TRIM` (4).
    Trim,
    /// `NBD_CMD_CACHE` (5).
    Cache,
    /// `NBD_CMD_WRITE_ZEROES` (6).
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS` (7).
    BlockStatus,
    /// Any other command: answered with `EINVAL`.
    Other(u16),
}

impl Command {
    /// The command's number.
    pub fn code(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disconnect => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::Cache => 5,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
            Command::Other(c) => c,
        }
    }

    /// The command numbered `code`.
    pub fn from_code(code: u16) -> Command {
        match code {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disconnect,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            c => Command::Other(c),
        }
    }
}

/// A request header (a write's data follows it on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags ([`super::command_flags`]).
    pub flags: u16,
    /// The command.
    pub command: Command,
    /// The client's cookie, echoed in the reply.
    pub cookie: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Length in bytes.
    pub length: u32,
}

impl Request {
    /// Bytes on the wire.
    pub const LEN: usize = 28;

    /// Decodes a request header.
    pub fn decode(data: &[u8]) -> Result<Request, ProtocolError> {
        let mut b = Bytes::new(data, "request");
        let magic = b.u32()?;
        if magic != REQUEST_MAGIC {
            return Err(ProtocolError::BadMagic {
                what: "request",
                found: u64::from(magic),
            });
        }
        let flags = b.u16()?;
        let command = Command::from_code(b.u16()?);
        let cookie = b.u64()?;
        let offset = b.u64()?;
        let length = b.u32()?;
        b.end()?;
        Ok(Request {
            flags,
            command,
            cookie,
            offset,
            length,
        })
    }

    /// Appends the request header.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.command.code().to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
    }
}

/// A simple reply's header (a read's data follows it on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// 0, or an errno ([`super::errno`]).
    pub error: u32,
    /// The request's cookie.
    pub cookie: u64,
}

impl SimpleReply {
    /// Bytes on the wire.
    pub const LEN: usize = 16;

    /// Appends the reply header.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.error.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
    }

    /// Decodes a reply header.
    pub fn decode(data: &[u8]) -> Result<SimpleReply, ProtocolError> {
        let mut b = Bytes::new(data, "simple reply");
        let magic = b.u32()?;
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(ProtocolError::BadMagic {
                what: "simple reply",
                found: u64::from(magic),
            });
        }
        let error = b.u32()?;
        let cookie = b.u64()?;
        b.end()?;
        Ok(SimpleReply { error, cookie })
    }
}

/// One extent of a block status reply: `length` bytes with `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    /// Bytes.
    pub length: u32,
    /// The context's flags (or value, for `qemu:allocation-depth`).
    pub flags: u32,
}

/// What a structured reply chunk carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkBody {
    /// `NBD_REPLY_TYPE_NONE`: nothing (the reply is done).
    None,
    /// `NBD_REPLY_TYPE_OFFSET_DATA`.
    OffsetData {
        /// Offset of the data in the export.
        offset: u64,
        /// The data.
        data: Vec<u8>,
    },
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`: zeros.
    OffsetHole {
        /// Offset in the export.
        offset: u64,
        /// Bytes of zeros.
        length: u32,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`.
    BlockStatus {
        /// The metadata context id.
        context: u32,
        /// Extents, in order from the request's offset.
        extents: Vec<StatusExtent>,
    },
    /// `NBD_REPLY_TYPE_ERROR`.
    Error {
        /// The errno.
        error: u32,
        /// A message for humans.
        message: String,
    },
    /// `NBD_REPLY_TYPE_ERROR_OFFSET`.
    ErrorOffset {
        /// The errno.
        error: u32,
        /// A message for humans.
        message: String,
        /// Where the error is.
        offset: u64,
    },
}

/// A structured reply chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Chunk flags ([`chunk::FLAG_DONE`]).
    pub flags: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// What it carries.
    pub body: ChunkBody,
}

/// Longest message in an error chunk (the length is a u16).
const MAX_MESSAGE: usize = u16::MAX as usize;

impl Chunk {
    /// Bytes of the header before the payload.
    pub const HEADER_LEN: usize = 20;

    /// Appends a chunk header of type `kind` announcing `length` bytes of payload.
    pub fn encode_header(flags: u16, kind: u16, cookie: u64, length: u32, out: &mut Vec<u8>) {
        out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&length.to_be_bytes());
    }

    /// Appends the header of an `OFFSET_DATA` chunk whose `len` bytes of data the caller
    /// sends next (so data is never copied into the reply).
    pub fn encode_data_header(flags: u16, cookie: u64, offset: u64, len: u32, out: &mut Vec<u8>) {
        Self::encode_header(flags, chunk::OFFSET_DATA, cookie, len + 8, out);
        out.extend_from_slice(&offset.to_be_bytes());
    }

    /// Appends the whole chunk.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut payload = Vec::new();
        let kind = match &self.body {
            ChunkBody::None => chunk::NONE,
            ChunkBody::OffsetData { offset, data } => {
                payload.extend_from_slice(&offset.to_be_bytes());
                payload.extend_from_slice(data);
                chunk::OFFSET_DATA
            }
            ChunkBody::OffsetHole { offset, length } => {
                payload.extend_from_slice(&offset.to_be_bytes());
                payload.extend_from_slice(&length.to_be_bytes());
                chunk::OFFSET_HOLE
            }
            ChunkBody::BlockStatus { context, extents } => {
                payload.extend_from_slice(&context.to_be_bytes());
                for e in extents {
                    payload.extend_from_slice(&e.length.to_be_bytes());
                    payload.extend_from_slice(&e.flags.to_be_bytes());
                }
                chunk::BLOCK_STATUS
            }
            ChunkBody::Error { error, message } | ChunkBody::ErrorOffset { error, message, .. } => {
                let message = &message.as_bytes()[..message.len().min(MAX_MESSAGE)];
                payload.extend_from_slice(&error.to_be_bytes());
                payload.extend_from_slice(&(message.len() as u16).to_be_bytes());
                payload.extend_from_slice(message);
                match &self.body {
                    ChunkBody::ErrorOffset { offset, .. } => {
                        payload.extend_from_slice(&offset.to_be_bytes());
                        chunk::ERROR_OFFSET
                    }
                    _ => chunk::ERROR,
                }
            }
        };
        Self::encode_header(self.flags, kind, self.cookie, payload.len() as u32, out);
        out.extend_from_slice(&payload);
    }

    /// The length of the chunk starting `data` (header and payload), once its header is
    /// there.
    pub fn total_len(header: &[u8]) -> Result<usize, ProtocolError> {
        let mut b = Bytes::new(header, "structured reply");
        let magic = b.u32()?;
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(ProtocolError::BadMagic {
                what: "structured reply",
                found: u64::from(magic),
            });
        }
        b.take(12)?;
        Ok(Self::HEADER_LEN + b.u32()? as usize)
    }

    /// Decodes one whole chunk (exactly its bytes).
    pub fn decode(data: &[u8]) -> Result<Chunk, ProtocolError> {
        let total = Self::total_len(data)?;
        if data.len() != total {
            return Err(ProtocolError::TrailingBytes {
                what: "structured reply",
                extra: data.len().saturating_sub(total),
            });
        }
        let mut b = Bytes::new(data, "structured reply");
        b.u32()?;
        let flags = b.u16()?;
        let kind = b.u16()?;
        let cookie = b.u64()?;
        b.u32()?;
        let body = match kind {
            chunk::NONE => ChunkBody::None,
            chunk::OFFSET_DATA => ChunkBody::OffsetData {
                offset: b.u64()?,
                data: b.rest().to_vec(),
            },
            chunk::OFFSET_HOLE => ChunkBody::OffsetHole {
                offset: b.u64()?,
                length: b.u32()?,
            },
            chunk::BLOCK_STATUS => {
                let context = b.u32()?;
                if b.remaining() % 8 != 0 || b.remaining() == 0 {
                    return Err(ProtocolError::Invalid {
                        what: "block status payload length",
                        value: b.remaining() as u64,
                    });
                }
                let mut extents = Vec::with_capacity(b.remaining() / 8);
                while b.remaining() > 0 {
                    extents.push(StatusExtent {
                        length: b.u32()?,
                        flags: b.u32()?,
                    });
                }
                ChunkBody::BlockStatus { context, extents }
            }
            chunk::ERROR | chunk::ERROR_OFFSET => {
                let error = b.u32()?;
                let len = b.u16()? as usize;
                let message = String::from_utf8_lossy(b.take(len)?).into_owned();
                if kind == chunk::ERROR {
                    ChunkBody::Error { error, message }
                } else {
                    ChunkBody::ErrorOffset {
                        error,
                        message,
                        offset: b.u64()?,
                    }
                }
            }
            other => {
                return Err(ProtocolError::Invalid {
                    what: "structured reply type",
                    value: u64::from(other),
                });
            }
        };
        b.end()?;
        Ok(Chunk {
            flags,
            cookie,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::command_flags;
    use super::*;

    #[test]
    fn every_command_round_trips() {
        for code in 0..10u16 {
            let command = Command::from_code(code);
            assert_eq!(command.code(), code);
            let r = Request {
                flags: command_flags::FUA | command_flags::REQ_ONE,
                command,
                cookie: 0x0102_0304_0506_0708,
                offset: 1 << 33,
                length: 65536,
            };
            let mut out = Vec::new();
            r.encode(&mut out);
            assert_eq!(out.len(), Request::LEN);
            assert_eq!(Request::decode(&out).unwrap(), r);
        }
        assert_eq!(Command::from_code(9), Command::Other(9));
    }

    #[test]
    fn bad_requests_are_refused() {
        let mut out = Vec::new();
        Request {
            flags: 0,
            command: Command::Read,
            cookie: 1,
            offset: 0,
            length: 1,
        }
        .encode(&mut out);
        assert!(matches!(
            Request::decode(&out[..27]),
            Err(ProtocolError::Truncated { .. })
        ));
        out[0] = 0;
        assert!(matches!(
            Request::decode(&out),
            Err(ProtocolError::BadMagic { .. })
        ));
    }

    #[test]
    fn simple_replies_round_trip() {
        let r = SimpleReply {
            error: 22,
            cookie: 99,
        };
        let mut out = Vec::new();
        r.encode(&mut out);
        assert_eq!(SimpleReply::decode(&out).unwrap(), r);
        out[1] ^= 1;
        assert!(SimpleReply::decode(&out).is_err());
    }

    #[test]
    fn every_chunk_round_trips() {
        for body in [
            ChunkBody::None,
            ChunkBody::OffsetData {
                offset: 4096,
                data: vec![1, 2, 3],
            },
            ChunkBody::OffsetHole {
                offset: 8192,
                length: 512,
            },
            ChunkBody::BlockStatus {
                context: 1,
                extents: vec![
                    StatusExtent {
                        length: 65536,
                        flags: 3,
                    },
                    StatusExtent {
                        length: 512,
                        flags: 0,
                    },
                ],
            },
            ChunkBody::Error {
                error: 5,
                message: "boom".into(),
            },
            ChunkBody::ErrorOffset {
                error: 5,
                message: String::new(),
                offset: 77,
            },
        ] {
            let c = Chunk {
                flags: chunk::FLAG_DONE,
                cookie: 42,
                body,
            };
            let mut out = Vec::new();
            c.encode(&mut out);
            assert_eq!(Chunk::total_len(&out[..20]).unwrap(), out.len());
            assert_eq!(Chunk::decode(&out).unwrap(), c);
        }
    }

    #[test]
    fn a_data_header_matches_the_whole_chunk() {
        let mut whole = Vec::new();
        Chunk {
            flags: 1,
            cookie: 5,
            body: ChunkBody::OffsetData {
                offset: 10,
                data: vec![7; 4],
            },
        }
        .encode(&mut whole);
        let mut head = Vec::new();
        Chunk::encode_data_header(1, 5, 10, 4, &mut head);
        assert_eq!(&whole[..head.len()], &head[..]);
    }

    #[test]
    fn bad_chunks_are_refused() {
        let mut out = Vec::new();
        Chunk::encode_header(1, 99, 1, 0, &mut out);
        assert!(matches!(
            Chunk::decode(&out),
            Err(ProtocolError::Invalid { .. })
        ));
        // A block status payload that is not whole extents.
        let mut out = Vec::new();
        Chunk::encode_header(1, chunk::BLOCK_STATUS, 1, 7, &mut out);
        out.extend_from_slice(&[0; 7]);
        assert!(matches!(
            Chunk::decode(&out),
            Err(ProtocolError::Invalid { .. })
        ));
        // An error message longer than its payload.
        let mut out = Vec::new();
        Chunk::encode_header(1, chunk::ERROR, 1, 6, &mut out);
        out.extend_from_slice(&[0, 0, 0, 5, 0, 9]);
        assert!(matches!(
            Chunk::decode(&out),
            Err(ProtocolError::Truncated { .. })
        ));
        // Bytes past the announced length, and a bad magic.
        let mut out = Vec::new();
        Chunk::encode_header(1, chunk::NONE, 1, 0, &mut out);
        out.push(0);
        assert!(matches!(
            Chunk::decode(&out),
            Err(ProtocolError::TrailingBytes { .. })
        ));
        out[0] = 0;
        assert!(matches!(
            Chunk::total_len(&out),
            Err(ProtocolError::BadMagic { .. })
        ));
    }
}

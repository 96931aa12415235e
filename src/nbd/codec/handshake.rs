//! The handshake: the server's greeting, the client's flags, option requests and option
//! replies (fixed newstyle negotiation).

use super::{
    Bytes, IHAVEOPT, MAX_STRING, NBD_MAGIC, OPTION_REPLY_MAGIC, ProtocolError, info, option,
    put_string32, reply,
};

/// The server's first message: `NBDMAGIC`, `IHAVEOPT` and its handshake flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    /// Handshake flags ([`super::handshake_flags`]).
    pub flags: u16,
}

impl Greeting {
    /// Bytes on the wire.
    pub const LEN: usize = 18;

    /// Appends the greeting.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&NBD_MAGIC.to_be_bytes());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
    }

    /// Reads a greeting (what a client does).
    pub fn decode(data: &[u8]) -> Result<Greeting, ProtocolError> {
        let mut b = Bytes::new(data, "greeting");
        let magic = b.u64()?;
        if magic != NBD_MAGIC {
            return Err(ProtocolError::BadMagic {
                what: "greeting",
                found: magic,
            });
        }
        let opt = b.u64()?;
        if opt != IHAVEOPT {
            return Err(ProtocolError::BadMagic {
                what: "greeting (not newstyle)",
                found: opt,
            });
        }
        let flags = b.u16()?;
        b.end()?;
        Ok(Greeting { flags })
    }
}

/// The header of an option request: `IHAVEOPT`, the option and the length of its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option (`NBD_OPT_*`).
    pub option: u32,
    /// Bytes of data that follow.
    pub length: u32,
}

impl OptionHeader {
    /// Bytes on the wire.
    pub const LEN: usize = 16;

    /// Reads the header.
    pub fn decode(data: &[u8]) -> Result<OptionHeader, ProtocolError> {
        let mut b = Bytes::new(data, "option request");
        let magic = b.u64()?;
        if magic != IHAVEOPT {
            return Err(ProtocolError::BadMagic {
                what: "option request",
                found: magic,
            });
        }
        let option = b.u32()?;
        let length = b.u32()?;
        b.end()?;
        Ok(OptionHeader { option, length })
    }

    /// Appends the header.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&self.option.to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
    }
}

/// The export and queries of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// The export's name.
    pub export: String,
    /// The queries (`base:allocation`, `qemu:`, ...); none lists every context.
    pub queries: Vec<String>,
}

/// An option request, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionRequest {
    /// `NBD_OPT_EXPORT_NAME`: enter transmission on the export named.
    ExportName(String),
    /// `NBD_OPT_ABORT`.
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_INFO`: describe an export (info types requested).
    Info {
        /// The export's name.
        name: String,
        /// Info types the client asks for.
        requests: Vec<u16>,
    },
    /// `NBD_OPT_GO`: as `Info`, then enter transmission.
    Go {
        /// The export's name.
        name: String,
        /// Info types the client asks for.
        requests: Vec<u16>,
    },
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMetaContext(MetaContextRequest),
    /// `NBD_OPT_SET_META_CONTEXT`.
    SetMetaContext(MetaContextRequest),
    /// Any other option (its data ignored): the server answers `NBD_REP_ERR_UNSUP`.
    Unknown(u32),
}

impl OptionRequest {
    /// Decodes option `option` from its data.
    pub fn decode(option: u32, data: &[u8]) -> Result<OptionRequest, ProtocolError> {
        let mut b = Bytes::new(data, "option data");
        let request = match option {
            option::EXPORT_NAME => {
                let name = b.string(data.len(), "export name")?;
                OptionRequest::ExportName(name)
            }
            option::ABORT => OptionRequest::Abort,
            option::LIST => OptionRequest::List,
            option::STRUCTURED_REPLY => OptionRequest::StructuredReply,
            option::INFO | option::GO => {
                let name = b.string32("export name")?;
                let count = b.u16()? as usize;
                if b.remaining() != count * 2 {
                    return Err(ProtocolError::Invalid {
                        what: "info request count",
                        value: count as u64,
                    });
                }
                let requests = (0..count).map(|_| b.u16()).collect::<Result<_, _>>()?;
                if option == option::INFO {
                    OptionRequest::Info { name, requests }
                } else {
                    OptionRequest::Go { name, requests }
                }
            }
            option::LIST_META_CONTEXT | option::SET_META_CONTEXT => {
                let export = b.string32("export name")?;
                let count = b.u32()? as usize;
                // Each query takes at least its 4-byte length: a count the data cannot
                // hold is refused before anything is allocated for it.
                if count > b.remaining() / 4 {
                    return Err(ProtocolError::Invalid {
                        what: "meta context query count",
                        value: count as u64,
                    });
                }
                let mut queries = Vec::with_capacity(count);
                for _ in 0..count {
                    queries.push(b.string32("meta context query")?);
                }
                let request = MetaContextRequest { export, queries };
                if option == option::LIST_META_CONTEXT {
                    OptionRequest::ListMetaContext(request)
                } else {
                    OptionRequest::SetMetaContext(request)
                }
            }
            other => {
                b.rest();
                OptionRequest::Unknown(other)
            }
        };
        b.end()?;
        Ok(request)
    }

    /// The option number.
    pub fn option(&self) -> u32 {
        match self {
            OptionRequest::ExportName(_) => option::EXPORT_NAME,
            OptionRequest::Abort => option::ABORT,
            OptionRequest::List => option::LIST,
            OptionRequest::Info { .. } => option::INFO,
            OptionRequest::Go { .. } => option::GO,
            OptionRequest::StructuredReply => option::STRUCTURED_REPLY,
            OptionRequest::ListMetaContext(_) => option::LIST_META_CONTEXT,
            OptionRequest::SetMetaContext(_) => option::SET_META_CONTEXT,
            OptionRequest::Unknown(o) => *o,
        }
    }

    /// Appends the whole request: header and data.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut data = Vec::new();
        match self {
            OptionRequest::ExportName(name) => data.extend_from_slice(name.as_bytes()),
            OptionRequest::Abort
            | OptionRequest::List
            | OptionRequest::StructuredReply
            | OptionRequest::Unknown(_) => {}
            OptionRequest::Info { name, requests } | OptionRequest::Go { name, requests } => {
                put_string32(&mut data, name);
                data.extend_from_slice(&(requests.len() as u16).to_be_bytes());
                for r in requests {
                    data.extend_from_slice(&r.to_be_bytes());
                }
            }
            OptionRequest::ListMetaContext(m) | OptionRequest::SetMetaContext(m) => {
                put_string32(&mut data, &m.export);
                data.extend_from_slice(&(m.queries.len() as u32).to_be_bytes());
                for q in &m.queries {
                    put_string32(&mut data, q);
                }
            }
        }
        OptionHeader {
            option: self.option(),
            length: data.len() as u32,
        }
        .encode(out);
        out.extend_from_slice(&data);
    }
}

/// One piece of information about an export (`NBD_REP_INFO`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoItem {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    Export {
        /// Bytes.
        size: u64,
        /// Transmission flags ([`super::transmission_flags`]).
        flags: u16,
    },
    /// `NBD_INFO_NAME`.
    Name(String),
    /// `NBD_INFO_DESCRIPTION`.
    Description(String),
    /// `NBD_INFO_BLOCK_SIZE`.
    BlockSize {
        /// Smallest block size.
        min: u32,
        /// Preferred block size.
        preferred: u32,
        /// Largest request payload.
        max: u32,
    },
}

impl InfoItem {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            InfoItem::Export { size, flags } => {
                out.extend_from_slice(&info::EXPORT.to_be_bytes());
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
            }
            InfoItem::Name(s) | InfoItem::Description(s) => {
                let kind = match self {
                    InfoItem::Name(_) => info::NAME,
                    _ => info::DESCRIPTION,
                };
                out.extend_from_slice(&kind.to_be_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            InfoItem::BlockSize {
                min,
                preferred,
                max,
            } => {
                out.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
                for v in [min, preferred, max] {
                    out.extend_from_slice(&v.to_be_bytes());
                }
            }
        }
    }

    fn decode(b: &mut Bytes<'_>) -> Result<InfoItem, ProtocolError> {
        let item = match b.u16()? {
            info::EXPORT => InfoItem::Export {
                size: b.u64()?,
                flags: b.u16()?,
            },
            info::NAME => InfoItem::Name(b.string(b.remaining(), "info name")?),
            info::DESCRIPTION => {
                InfoItem::Description(b.string(b.remaining(), "info description")?)
            }
            info::BLOCK_SIZE => InfoItem::BlockSize {
                min: b.u32()?,
                preferred: b.u32()?,
                max: b.u32()?,
            },
            other => {
                return Err(ProtocolError::Invalid {
                    what: "info type",
                    value: u64::from(other),
                });
            }
        };
        Ok(item)
    }
}

/// What an option reply says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionReplyBody {
    /// `NBD_REP_ACK`.
    Ack,
    /// `NBD_REP_SERVER`: one export of `NBD_OPT_LIST`.
    Server {
        /// Its name.
        name: String,
        /// Its description (may be empty).
        description: String,
    },
    /// `NBD_REP_INFO`.
    Info(InfoItem),
    /// `NBD_REP_META_CONTEXT`: a context and the id requests name it by.
    MetaContext {
        /// The id (0 when only listing).
        id: u32,
        /// The context's name.
        name: String,
    },
    /// An error reply (`NBD_REP_ERR_*`, bit 31 set) with a message for humans.
    Error {
        /// The reply type.
        code: u32,
        /// The message (may be empty).
        message: String,
    },
}

/// An option reply: the option it answers and what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    /// The option answered.
    pub option: u32,
    /// The reply.
    pub body: OptionReplyBody,
}

impl OptionReply {
    /// Bytes of the header before the reply's data.
    pub const HEADER_LEN: usize = 20;

    /// Appends the reply.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut data = Vec::new();
        let kind = match &self.body {
            OptionReplyBody::Ack => reply::ACK,
            OptionReplyBody::Server { name, description } => {
                put_string32(&mut data, name);
                data.extend_from_slice(description.as_bytes());
                reply::SERVER
            }
            OptionReplyBody::Info(item) => {
                item.encode(&mut data);
                reply::INFO
            }
            OptionReplyBody::MetaContext { id, name } => {
                data.extend_from_slice(&id.to_be_bytes());
                data.extend_from_slice(name.as_bytes());
                reply::META_CONTEXT
            }
            OptionReplyBody::Error { code, message } => {
                data.extend_from_slice(message.as_bytes());
                *code
            }
        };
        out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.option.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(&data);
    }

    /// The length of the reply starting `data` (header and data), once its header is
    /// there: what a client reads next.
    pub fn total_len(header: &[u8]) -> Result<usize, ProtocolError> {
        let mut b = Bytes::new(header, "option reply");
        let magic = b.u64()?;
        if magic != OPTION_REPLY_MAGIC {
            return Err(ProtocolError::BadMagic {
                what: "option reply",
                found: magic,
            });
        }
        b.u32()?;
        b.u32()?;
        Ok(Self::HEADER_LEN + b.u32()? as usize)
    }

    /// Decodes one whole reply (exactly its bytes).
    pub fn decode(data: &[u8]) -> Result<OptionReply, ProtocolError> {
        let total = Self::total_len(data)?;
        let mut b = Bytes::new(data, "option reply");
        b.take(8)?;
        let option = b.u32()?;
        let kind = b.u32()?;
        b.u32()?;
        if data.len() != total {
            return Err(ProtocolError::TrailingBytes {
                what: "option reply",
                extra: data.len().saturating_sub(total),
            });
        }
        let body = match kind {
            reply::ACK => OptionReplyBody::Ack,
            reply::SERVER => {
                let name = b.string32("export name")?;
                let description = b.string(b.remaining().min(MAX_STRING + 1), "description")?;
                OptionReplyBody::Server { name, description }
            }
            reply::INFO => OptionReplyBody::Info(InfoItem::decode(&mut b)?),
            reply::META_CONTEXT => {
                let id = b.u32()?;
                let name = b.string(b.remaining(), "meta context")?;
                OptionReplyBody::MetaContext { id, name }
            }
            code if code & (1 << 31) != 0 => OptionReplyBody::Error {
                code,
                message: String::from_utf8_lossy(b.rest()).into_owned(),
            },
            other => {
                return Err(ProtocolError::Invalid {
                    what: "option reply type",
                    value: u64::from(other),
                });
            }
        };
        b.end()?;
        Ok(OptionReply { option, body })
    }
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size and transmission flags, then 124 zero bytes
/// unless both sides agreed on `NO_ZEROES`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportNameReply {
    /// Bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
}

impl ExportNameReply {
    /// Appends the reply.
    pub fn encode(&self, no_zeroes: bool, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        if !no_zeroes {
            out.extend_from_slice(&[0u8; 124]);
        }
    }

    /// Decodes the reply (10 bytes, or 134 with the zeroes).
    pub fn decode(data: &[u8]) -> Result<ExportNameReply, ProtocolError> {
        let mut b = Bytes::new(data, "export name reply");
        let size = b.u64()?;
        let flags = b.u16()?;
        match b.remaining() {
            0 => {}
            124 if b.rest().iter().all(|&z| z == 0) => {}
            extra => {
                return Err(ProtocolError::TrailingBytes {
                    what: "export name reply",
                    extra,
                });
            }
        }
        Ok(ExportNameReply { size, flags })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(request: OptionRequest) {
        let mut out = Vec::new();
        request.encode(&mut out);
        let header = OptionHeader::decode(&out[..16]).unwrap();
        assert_eq!(header.length as usize, out.len() - 16);
        assert_eq!(
            OptionRequest::decode(header.option, &out[16..]).unwrap(),
            request
        );
    }

    #[test]
    fn every_option_request_round_trips() {
        let meta = MetaContextRequest {
            export: "disk".into(),
            queries: vec!["base:allocation".into(), "qemu:".into()],
        };
        for request in [
            OptionRequest::ExportName("disk".into()),
            OptionRequest::ExportName(String::new()),
            OptionRequest::Abort,
            OptionRequest::List,
            OptionRequest::Info {
                name: "x".into(),
                requests: vec![],
            },
            OptionRequest::Go {
                name: "".into(),
                requests: vec![info::BLOCK_SIZE, info::NAME],
            },
            OptionRequest::StructuredReply,
            OptionRequest::ListMetaContext(meta.clone()),
            OptionRequest::SetMetaContext(MetaContextRequest {
                queries: vec![],
                ..meta
            }),
            OptionRequest::Unknown(77),
        ] {
            round_trip(request);
        }
    }

    #[test]
    fn every_option_reply_round_trips() {
        for body in [
            OptionReplyBody::Ack,
            OptionReplyBody::Server {
                name: "disk".into(),
                description: "a disk".into(),
            },
            OptionReplyBody::Info(InfoItem::Export {
                size: 1 << 40,
                flags: 0x1ed,
            }),
            OptionReplyBody::Info(InfoItem::Name("n".into())),
            OptionReplyBody::Info(InfoItem::Description("d".into())),
            OptionReplyBody::Info(InfoItem::BlockSize {
                min: 1,
                preferred: 4096,
                max: 32 << 20,
            }),
            OptionReplyBody::MetaContext {
                id: 3,
                name: "base:allocation".into(),
            },
            OptionReplyBody::Error {
                code: reply::ERR_UNKNOWN,
                message: "no such export".into(),
            },
        ] {
            let r = OptionReply { option: 7, body };
            let mut out = Vec::new();
            r.encode(&mut out);
            assert_eq!(OptionReply::total_len(&out[..20]).unwrap(), out.len());
            assert_eq!(OptionReply::decode(&out).unwrap(), r);
        }
    }

    #[test]
    fn greeting_and_export_name_reply_round_trip() {
        let mut out = Vec::new();
        Greeting { flags: 3 }.encode(&mut out);
        assert_eq!(out.len(), Greeting::LEN);
        assert_eq!(Greeting::decode(&out).unwrap(), Greeting { flags: 3 });
        for zeroes in [false, true] {
            let r = ExportNameReply {
                size: 12345,
                flags: 1,
            };
            let mut out = Vec::new();
            r.encode(zeroes, &mut out);
            assert_eq!(out.len(), if zeroes { 10 } else { 134 });
            assert_eq!(ExportNameReply::decode(&out).unwrap(), r);
        }
    }

    #[test]
    fn bad_magic_is_refused() {
        let mut out = Vec::new();
        OptionRequest::List.encode(&mut out);
        out[0] ^= 1;
        assert!(matches!(
            OptionHeader::decode(&out),
            Err(ProtocolError::BadMagic { .. })
        ));
        let mut g = Vec::new();
        Greeting { flags: 1 }.encode(&mut g);
        g[9] ^= 1;
        assert!(matches!(
            Greeting::decode(&g),
            Err(ProtocolError::BadMagic { .. })
        ));
        let mut r = Vec::new();
        OptionReply {
            option: 1,
            body: OptionReplyBody::Ack,
        }
        .encode(&mut r);
        r[3] ^= 1;
        assert!(matches!(
            OptionReply::decode(&r),
            Err(ProtocolError::BadMagic { .. })
        ));
    }

    #[test]
    fn short_and_long_option_data_is_refused() {
        // An info request claiming a 10-byte name in 4 bytes.
        let data = [0, 0, 0, 10, b'a'];
        assert!(matches!(
            OptionRequest::decode(option::GO, &data),
            Err(ProtocolError::Truncated { .. })
        ));
        // Info requests counted wrong.
        let data = [0, 0, 0, 0, 0, 2, 0, 1];
        assert!(matches!(
            OptionRequest::decode(option::INFO, &data),
            Err(ProtocolError::Invalid { .. })
        ));
        // Data on an option that takes none.
        assert!(matches!(
            OptionRequest::decode(option::STRUCTURED_REPLY, &[1]),
            Err(ProtocolError::TrailingBytes { .. })
        ));
        assert!(matches!(
            OptionRequest::decode(option::LIST, &[1]),
            Err(ProtocolError::TrailingBytes { .. })
        ));
        // A query count the data cannot hold, and a name past the limit.
        let data = [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            OptionRequest::decode(option::SET_META_CONTEXT, &data),
            Err(ProtocolError::Invalid { .. })
        ));
        let long = vec![b'a'; MAX_STRING + 1];
        assert!(matches!(
            OptionRequest::decode(option::EXPORT_NAME, &long),
            Err(ProtocolError::StringTooLong { .. })
        ));
        assert!(matches!(
            OptionRequest::decode(option::EXPORT_NAME, &[0xff, 0xfe]),
            Err(ProtocolError::NotUtf8 { .. })
        ));
        // Trailing bytes after the last query.
        let mut out = Vec::new();
        OptionRequest::ListMetaContext(MetaContextRequest {
            export: String::new(),
            queries: vec!["q".into()],
        })
        .encode(&mut out);
        out.push(0);
        assert!(matches!(
            OptionRequest::decode(option::LIST_META_CONTEXT, &out[16..]),
            Err(ProtocolError::TrailingBytes { .. })
        ));
    }

    #[test]
    fn bad_replies_are_refused() {
        let mut r = Vec::new();
        OptionReply {
            option: 1,
            body: OptionReplyBody::Info(InfoItem::Name("x".into())),
        }
        .encode(&mut r);
        // An unknown info type.
        r[21] = 9;
        assert!(matches!(
            OptionReply::decode(&r),
            Err(ProtocolError::Invalid { .. })
        ));
        // An unknown non-error reply type.
        let mut r = Vec::new();
        OptionReply {
            option: 1,
            body: OptionReplyBody::Ack,
        }
        .encode(&mut r);
        r[15] = 9;
        assert!(matches!(
            OptionReply::decode(&r),
            Err(ProtocolError::Invalid { .. })
        ));
        r[15] = 1;
        r.push(0);
        assert!(matches!(
            OptionReply::decode(&r),
            Err(ProtocolError::TrailingBytes { .. })
        ));
        assert!(matches!(
            ExportNameReply::decode(&[0; 11]),
            Err(ProtocolError::TrailingBytes { .. })
        ));
        assert!(matches!(
            ExportNameReply::decode(&[0; 9]),
            Err(ProtocolError::Truncated { .. })
        ));
    }
}

//! Fixed newstyle negotiation: the greeting, then options until the client enters
//! transmission (`NBD_OPT_GO`, `NBD_OPT_EXPORT_NAME`) or leaves.

use std::io::{self, Read, Write};

use crate::nbd::codec::{
    ExportNameReply, Greeting, InfoItem, OptionHeader, OptionReply, OptionReplyBody, OptionRequest,
    handshake_flags, info, option, reply,
};

use super::export::{Context, Export, MAX_PAYLOAD};

/// Largest option data read (a meta context request with many queries fits); longer
/// data is skipped and answered `NBD_REP_ERR_TOO_BIG`.
pub(crate) const MAX_OPTION_DATA: u32 = 64 << 10;

/// What the client agreed on for transmission.
#[derive(Debug, Clone, Default)]
pub(crate) struct Session {
    /// Structured replies were negotiated.
    pub(crate) structured: bool,
    /// The metadata contexts selected, by id - 1.
    pub(crate) contexts: Vec<Context>,
}

/// Runs negotiation; `None` when the client left (or must be disconnected) before
/// transmission.
pub(crate) fn negotiate<R: Read, W: Write>(
    export: &Export,
    reader: &mut R,
    writer: &mut W,
) -> io::Result<Option<Session>> {
    let mut out = Vec::new();
    Greeting {
        flags: handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES,
    }
    .encode(&mut out);
    writer.write_all(&out)?;
    writer.flush()?;
    let mut flags = [0u8; 4];
    reader.read_exact(&mut flags)?;
    let client_flags = u32::from_be_bytes(flags);
    let known = handshake_flags::C_FIXED_NEWSTYLE | handshake_flags::C_NO_ZEROES;
    if client_flags & !known != 0 {
        // As QEMU: unknown client flags end the conversation.
        return Ok(None);
    }
    let no_zeroes = client_flags & handshake_flags::C_NO_ZEROES != 0;
    let mut session = Session::default();
    loop {
        let mut header = [0u8; OptionHeader::LEN];
        reader.read_exact(&mut header)?;
        let Ok(header) = OptionHeader::decode(&header) else {
            return Ok(None);
        };
        let send = |writer: &mut W, body: OptionReplyBody| -> io::Result<()> {
            let mut out = Vec::new();
            OptionReply {
                option: header.option,
                body,
            }
            .encode(&mut out);
            writer.write_all(&out)
        };
        let error = |code: u32, message: &str| OptionReplyBody::Error {
            code,
            message: message.to_owned(),
        };
        if header.length > MAX_OPTION_DATA {
            io::copy(
                &mut reader.by_ref().take(u64::from(header.length)),
                &mut io::sink(),
            )?;
            if header.option == option::EXPORT_NAME {
                return Ok(None);
            }
            send(writer, error(reply::ERR_TOO_BIG, "option data too long"))?;
            writer.flush()?;
            continue;
        }
        let mut data = vec![0u8; header.length as usize];
        reader.read_exact(&mut data)?;
        let request = match OptionRequest::decode(header.option, &data) {
            Ok(r) => r,
            Err(e) => {
                if header.option == option::EXPORT_NAME {
                    return Ok(None);
                }
                send(writer, error(reply::ERR_INVALID, &e.to_string()))?;
                writer.flush()?;
                continue;
            }
        };
        match request {
            OptionRequest::ExportName(name) => {
                if name != export.options.name {
                    // The protocol has no error reply here: the server disconnects.
                    return Ok(None);
                }
                let mut out = Vec::new();
                ExportNameReply {
                    size: export.size(),
                    flags: export.flags(session.structured),
                }
                .encode(no_zeroes, &mut out);
                writer.write_all(&out)?;
                writer.flush()?;
                return Ok(Some(session));
            }
            OptionRequest::Abort => {
                send(writer, OptionReplyBody::Ack)?;
                writer.flush()?;
                return Ok(None);
            }
            OptionRequest::List => {
                send(
                    writer,
                    OptionReplyBody::Server {
                        name: export.options.name.clone(),
                        description: export.options.description.clone(),
                    },
                )?;
                send(writer, OptionReplyBody::Ack)?;
            }
            OptionRequest::Info { name, requests } | OptionRequest::Go { name, requests } => {
                if name != export.options.name {
                    send(
                        writer,
                        error(reply::ERR_UNKNOWN, &format!("export '{name}' not present")),
                    )?;
                    writer.flush()?;
                    continue;
                }
                if requests.contains(&info::NAME) {
                    send(
                        writer,
                        OptionReplyBody::Info(InfoItem::Name(export.options.name.clone())),
                    )?;
                }
                if requests.contains(&info::DESCRIPTION) && !export.options.description.is_empty() {
                    send(
                        writer,
                        OptionReplyBody::Info(InfoItem::Description(
                            export.options.description.clone(),
                        )),
                    )?;
                }
                send(
                    writer,
                    OptionReplyBody::Info(InfoItem::BlockSize {
                        min: 1,
                        preferred: 4096,
                        max: MAX_PAYLOAD,
                    }),
                )?;
                send(
                    writer,
                    OptionReplyBody::Info(InfoItem::Export {
                        size: export.size(),
                        flags: export.flags(session.structured),
                    }),
                )?;
                send(writer, OptionReplyBody::Ack)?;
                writer.flush()?;
                if header.option == option::GO {
                    return Ok(Some(session));
                }
                continue;
            }
            OptionRequest::StructuredReply => {
                if session.structured {
                    send(
                        writer,
                        error(reply::ERR_INVALID, "structured replies already negotiated"),
                    )?;
                } else {
                    session.structured = true;
                    send(writer, OptionReplyBody::Ack)?;
                }
            }
            OptionRequest::ListMetaContext(m) | OptionRequest::SetMetaContext(m) => {
                let set = header.option == option::SET_META_CONTEXT;
                if !session.structured {
                    send(
                        writer,
                        error(
                            reply::ERR_INVALID,
                            "structured replies must be negotiated first",
                        ),
                    )?;
                } else if m.export != export.options.name {
                    send(
                        writer,
                        error(
                            reply::ERR_UNKNOWN,
                            &format!("export '{}' not present", m.export),
                        ),
                    )?;
                } else {
                    let mut chosen: Vec<(Context, String)> = Vec::new();
                    if m.queries.is_empty() && !set {
                        chosen = export.contexts();
                    }
                    for q in &m.queries {
                        for c in export.select(q) {
                            if !chosen.contains(&c) {
                                chosen.push(c);
                            }
                        }
                    }
                    if set {
                        session.contexts = chosen.iter().map(|(c, _)| *c).collect();
                    }
                    for (i, (_, name)) in chosen.into_iter().enumerate() {
                        let id = if set { i as u32 + 1 } else { 0 };
                        send(writer, OptionReplyBody::MetaContext { id, name })?;
                    }
                    send(writer, OptionReplyBody::Ack)?;
                }
            }
            OptionRequest::Unknown(code) => {
                let code_reply = if code == option::STARTTLS {
                    reply::ERR_POLICY
                } else {
                    reply::ERR_UNSUP
                };
                send(writer, error(code_reply, "option not supported"))?;
            }
        }
        writer.flush()?;
    }
}

//! Backend messages of the frontend/backend protocol, as far as a
//! replication connection meets them: a tag byte, a 4-byte length that
//! counts itself, the body. Pure functions over the read buffer.

use bytes::{Buf, Bytes, BytesMut};

use super::ReplicationError;

/// One message off the wire.
pub(super) struct Frame {
    pub tag: u8,
    pub body: Bytes,
}

/// Split the first whole message off `buf`, or `None` until more bytes
/// arrive. A length below 4 or above `max` is a broken stream.
pub(super) fn split_frame(
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<Frame>, ReplicationError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = u32::from_be_bytes(buf[1..5].try_into().expect("4 bytes")) as usize;
    if len < 4 || len > max {
        return Err(ReplicationError::protocol(format!(
            "message {:?} from the server claims {len} bytes",
            tag as char
        )));
    }
    if buf.len() < 1 + len {
        // Room for the rest, so a large message is read in few calls.
        buf.reserve(1 + len - buf.len());
        return Ok(None);
    }
    buf.advance(5);
    let body = buf.split_to(len - 4).freeze();
    Ok(Some(Frame { tag, body }))
}

/// Whether `buf` starts with a whole message (a broken length counts as
/// one: reading it reports the error).
pub(super) fn frame_ready(buf: &[u8]) -> bool {
    if buf.len() < 5 {
        return false;
    }
    let len = u32::from_be_bytes(buf[1..5].try_into().expect("4 bytes")) as usize;
    len < 4 || buf.len() > len
}

/// A server error or notice, by its fields. Only severity, SQLSTATE and
/// message are kept: DETAIL and the rest may carry row values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerError {
    pub severity: String,
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&pgcourier_common::pg::errors::describe_server_error(
            &self.severity,
            &self.code,
            &self.message,
        ))
    }
}

/// What the replication connection does with each message.
pub(super) enum Backend {
    AuthOk,
    AuthCleartext,
    AuthMd5([u8; 4]),
    AuthSasl(Vec<String>),
    AuthSaslContinue(Bytes),
    AuthSaslFinal(Bytes),
    /// GSS, SSPI, Kerberos, SCM credentials: the request code.
    AuthOther(u32),
    ReadyForQuery,
    DataRow(Vec<Option<String>>),
    CopyBoth,
    CopyData(Bytes),
    CopyDone,
    CommandComplete,
    Error(ServerError),
    Notice,
    /// ParameterStatus, BackendKeyData, RowDescription, …: not needed.
    Other(u8),
}

impl Backend {
    pub fn name(&self) -> String {
        match self {
            Backend::AuthOk => "AuthenticationOk".into(),
            Backend::AuthCleartext => "AuthenticationCleartextPassword".into(),
            Backend::AuthMd5(_) => "AuthenticationMD5Password".into(),
            Backend::AuthSasl(_) => "AuthenticationSASL".into(),
            Backend::AuthSaslContinue(_) => "AuthenticationSASLContinue".into(),
            Backend::AuthSaslFinal(_) => "AuthenticationSASLFinal".into(),
            Backend::AuthOther(c) => format!("authentication request {c}"),
            Backend::ReadyForQuery => "ReadyForQuery".into(),
            Backend::DataRow(_) => "DataRow".into(),
            Backend::CopyBoth => "CopyBothResponse".into(),
            Backend::CopyData(_) => "CopyData".into(),
            Backend::CopyDone => "CopyDone".into(),
            Backend::CommandComplete => "CommandComplete".into(),
            Backend::Error(_) => "ErrorResponse".into(),
            Backend::Notice => "NoticeResponse".into(),
            Backend::Other(t) => format!("message {:?}", *t as char),
        }
    }
}

fn short(what: &str) -> ReplicationError {
    ReplicationError::protocol(format!("{what} from the server is truncated"))
}

fn take_u32(b: &mut Bytes, what: &str) -> Result<u32, ReplicationError> {
    if b.len() < 4 {
        return Err(short(what));
    }
    Ok(b.get_u32())
}

/// A NUL-terminated string.
fn take_cstr(b: &mut Bytes, what: &str) -> Result<String, ReplicationError> {
    let end = b.iter().position(|&c| c == 0).ok_or_else(|| short(what))?;
    let s = String::from_utf8_lossy(&b[..end]).into_owned();
    b.advance(end + 1);
    Ok(s)
}

pub(super) fn decode(frame: Frame) -> Result<Backend, ReplicationError> {
    let mut b = frame.body;
    Ok(match frame.tag {
        b'R' => match take_u32(&mut b, "an authentication request")? {
            0 => Backend::AuthOk,
            3 => Backend::AuthCleartext,
            5 => {
                if b.len() < 4 {
                    return Err(short("an MD5 request"));
                }
                Backend::AuthMd5([b[0], b[1], b[2], b[3]])
            }
            10 => {
                let mut mechanisms = Vec::new();
                loop {
                    let m = take_cstr(&mut b, "a SASL request")?;
                    if m.is_empty() {
                        break;
                    }
                    mechanisms.push(m);
                }
                Backend::AuthSasl(mechanisms)
            }
            11 => Backend::AuthSaslContinue(b),
            12 => Backend::AuthSaslFinal(b),
            other => Backend::AuthOther(other),
        },
        b'Z' => Backend::ReadyForQuery,
        b'D' => {
            if b.len() < 2 {
                return Err(short("a DataRow"));
            }
            let n = b.get_u16() as usize;
            let mut row = Vec::with_capacity(n);
            for _ in 0..n {
                let len = take_u32(&mut b, "a DataRow")? as i32;
                if len < 0 {
                    row.push(None);
                    continue;
                }
                let len = len as usize;
                if b.len() < len {
                    return Err(short("a DataRow"));
                }
                row.push(Some(String::from_utf8_lossy(&b[..len]).into_owned()));
                b.advance(len);
            }
            Backend::DataRow(row)
        }
        b'W' => Backend::CopyBoth,
        b'd' => Backend::CopyData(b),
        b'c' => Backend::CopyDone,
        b'C' => Backend::CommandComplete,
        b'E' => Backend::Error(error_fields(&mut b)?),
        b'N' => Backend::Notice,
        other => Backend::Other(other),
    })
}

fn error_fields(b: &mut Bytes) -> Result<ServerError, ReplicationError> {
    let mut e = ServerError {
        severity: "ERROR".into(),
        code: "XX000".into(),
        message: String::new(),
    };
    loop {
        if b.is_empty() {
            return Err(short("an ErrorResponse"));
        }
        let field = b.get_u8();
        if field == 0 {
            return Ok(e);
        }
        let value = take_cstr(b, "an ErrorResponse")?;
        match field {
            // V: the severity never localized.
            b'V' => e.severity = value,
            b'C' => e.code = value,
            b'M' => e.message = value,
            _ => {}
        }
    }
}

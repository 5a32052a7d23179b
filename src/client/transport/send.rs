//! Writing the request on a connection, and reading its answer (or the
//! answer a server gave before it had the whole request).

use std::io::{self, Write};

use super::super::budget::is_stop;
use super::super::wire;
use super::answer::read_reply;
use super::socket::Conn;
use super::{Failure, Keep, Payload, Reply, stopped};

/// The request and its answer; the answer's head comes back when the
/// connection may carry another request.
pub(super) fn exchange_on<S: Conn>(
    conn: &mut S,
    head: &[u8],
    payload: Payload,
    keep: Keep,
) -> Result<(Reply, Option<wire::Head>), Failure> {
    let written = (|| {
        // 64 KiB chunks keep syscalls few and memory flat.
        let mut w = io::BufWriter::with_capacity(64 * 1024, &mut *conn);
        w.write_all(head)?;
        match payload {
            Payload::None => {}
            Payload::Bytes { bytes, .. } => w.write_all(bytes)?,
            Payload::Stream { write, .. } => write(&mut w)?,
        }
        w.flush()?;
        w.into_inner().map_err(|e| e.into_error())?.flush()
    })();
    if let Err(e) = written {
        if is_stop(&e) || e.kind() == io::ErrorKind::TimedOut {
            return Err(stopped(e, false));
        }
        // A server may answer before it has the whole request and close
        // (nginx's 413 for a body over client_max_body_size): that answer
        // says more than the reset our write then gets.
        return match read_reply(&mut *conn, keep) {
            Ok((reply, _)) => {
                log::debug!("the server answered HTTP {} before the request was sent ({e})", reply.status);
                // Half a request went out: the connection cannot be reused.
                Ok((reply, None))
            }
            Err(_) => Err(Failure::Net(e)),
        };
    }
    conn.mark_sent();
    read_reply(&mut *conn, keep).map_err(|f| match f {
        Failure::Net(e) => stopped(e, true),
        other => other,
    })
}

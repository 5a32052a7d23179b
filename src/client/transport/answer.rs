//! Reading an answer: its head, then its body dropped, kept in memory
//! or written to a file, each within its cap.

use std::io::{self, BufReader, Read, Write};

use super::super::wire::{self, BodyReader, Framing};
use super::{Failure, Keep, Reply};

/// The status counts only once the whole head (status line and headers,
/// up to the empty line) has arrived: a head cut off by a reset says
/// nothing about whether the server took the request, so it is an error,
/// not a status. Likewise a body shorter than announced.
///
/// The head comes back when the connection may be reused: HTTP/1.1
/// without `Connection: close`, a body that ends by its framing and was
/// read to that end, and nothing after it.
pub(super) fn read_reply<S: Read>(stream: S, keep: Keep) -> Result<(Reply, Option<wire::Head>), Failure> {
    let mut r = BufReader::new(stream);
    let head = wire::read_head(&mut r, false)?;
    let mut reply = Reply { status: head.status, location: head.location.clone(), body: Vec::new() };
    let mut body = BodyReader::new(&mut r, head.framing);
    let memory = |body: &mut BodyReader<_>, cap: usize| match wire::read_body_capped(body, head.framing, cap) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == io::ErrorKind::FileTooLarge => Err(Failure::TooLarge(cap as u64)),
        Err(e) => Err(Failure::Net(e)),
    };
    match keep {
        Keep::Drop(cap) => {
            if io::copy(&mut (&mut body).take((cap as u64).saturating_add(1)), &mut io::sink())? > cap as u64 {
                return Err(Failure::TooLarge(cap as u64));
            }
        }
        Keep::Memory(cap) => reply.body = memory(&mut body, cap)?,
        Keep::File { other, .. } if head.status != 200 => reply.body = memory(&mut body, other)?,
        Keep::File { path, cap, .. } => {
            if matches!(head.framing, Framing::Length(n) if n > cap) {
                return Err(Failure::TooLarge(cap));
            }
            let local = |e: io::Error| Failure::Local(path.to_path_buf(), e);
            // Not through a link, and only a file of this user's (see safe_fs).
            let mut file = crate::safe_fs::create_truncate(path, crate::safe_fs::PRIVATE_FILE).map_err(local)?;
            let mut limited = (&mut body).take(cap.saturating_add(1));
            let mut buf = vec![0u8; 64 * 1024];
            let mut n: u64 = 0;
            loop {
                let got = match limited.read(&mut buf) {
                    Ok(0) => break,
                    Ok(got) => got,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(Failure::Net(e)),
                };
                n = n.saturating_add(got as u64);
                if n > cap {
                    return Err(Failure::TooLarge(cap));
                }
                file.write_all(&buf[..got]).map_err(local)?;
            }
            file.flush().map_err(local)?;
        }
    }
    let reusable = !head.close && head.framing != Framing::UntilClose && body.finished() && r.buffer().is_empty();
    Ok((reply, reusable.then_some(head)))
}

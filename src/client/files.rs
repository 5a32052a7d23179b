//! The two calls that move files: the artifact tarball up, the job's
//! attachments down; both streamed, neither held in memory.

use std::path::Path;
use std::time::Duration;

use super::transport::{Keep, Payload};
use super::{ATTACHMENTS_MAX, Answer, Client, ClientError, SMALL_ANSWER};

impl Client {
    /// Uploads the artifact tarball at `archive` as `multipart/form-data`
    /// (part `file`), streamed from disk: memory use does not grow with its
    /// size. Retried like any call; a partial upload never counts as sent.
    pub fn post_artifact(&mut self, job_id: &str, archive: &Path) -> Result<(), ClientError> {
        let path = format!("/v1/result/{job_id}/artifact");
        let size = std::fs::metadata(archive)
            .map_err(|e| ClientError::Local { path: archive.to_path_buf(), reason: e.to_string() })?
            .len();
        let boundary = format!("tfboundary{:016x}", size ^ 0x5bd1_e995_u64.wrapping_mul(std::process::id() as u64));
        let head = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"file\"\r\nContent-Type: application/x-gzip\r\n\r\n"
        );
        let tail = format!("\r\n--{boundary}--\r\n");
        let len = head.len() as u64 + size + tail.len() as u64;
        let content_type = format!("multipart/form-data; boundary={boundary}");
        let mut write_body = |w: &mut dyn std::io::Write| -> std::io::Result<()> {
            w.write_all(head.as_bytes())?;
            let mut f = std::fs::File::open(archive)?;
            let copied = std::io::copy(&mut f, w)?;
            if copied != size {
                return Err(std::io::Error::other("archive changed size while uploading"));
            }
            w.write_all(tail.as_bytes())
        };
        self.call_streaming(&path, &content_type, len, &mut write_body, None, self.retry)
    }

    /// Downloads the job's attachments archive to `dest`, streaming.
    /// Returns false when the server has none (204).
    pub fn download_attachments(&mut self, job_id: &str, dest: &Path) -> Result<bool, ClientError> {
        let url = self.url(&format!("/v1/job/{job_id}/attachments"));
        let retry = self.retry;
        let a = self.with_retries("GET", &url, retry, None, &mut |c, _| c.download_once(&url, dest, retry.timeout))?;
        match a.status {
            200 => Ok(true),
            204 => Ok(false),
            status => Err(ClientError::Status { url, status, body: String::new() }),
        }
    }

    /// One download attempt; the body goes to `dest` only on a 200 (the
    /// answer's own body is left empty). A cut-off download is an error, to
    /// be retried, never unpacked.
    fn download_once(&self, url: &str, dest: &Path, timeout: Duration) -> Result<Answer, ClientError> {
        let keep = Keep::File { path: dest, cap: ATTACHMENTS_MAX, other: SMALL_ANSWER };
        let reply = self.exchange("GET", url, Payload::None, keep, timeout, None, true)?;
        Ok(Answer { status: reply.status, body: Vec::new() })
    }
}

//! The disk guard: no job is taken while `execution_basedir` is short of
//! `min_free_mb`, and the operator is told why, once.

use super::Agent;
use crate::notify;
use crate::states::AgentState;

impl Agent<'_> {
    /// The disk guard: below `min_free_mb` free under execution_basedir no
    /// job is taken; the first time, the log and the agent's state comment
    /// on the server say why, and again once space has returned.
    pub(super) fn disk_has_room(&mut self) -> bool {
        let min = self.config.min_free_mb().saturating_mul(1 << 20);
        let dir = self.config.execution_basedir();
        let free = match crate::vitals::disk_free(crate::vitals::existing_ancestor(dir)) {
            Some(f) if min > 0 => f,
            // Guard off, or nothing to measure: go on as before.
            _ => return true,
        };
        let low = free < min;
        if low != self.disk_low {
            self.disk_low = low;
            let comment = if low {
                let c = format!(
                    "Not taking jobs: {} MiB free under {}, below min_free_mb {}",
                    free >> 20,
                    dir.display(),
                    self.config.min_free_mb()
                );
                log::warn!("{c}");
                notify::status(&c);
                c
            } else {
                log::info!("{} MiB free under {} again; taking jobs", free >> 20, dir.display());
                String::new()
            };
            self.disk_comment_unposted = Some(comment);
        }
        if let Some(comment) = self.disk_comment_unposted.take() {
            let data = AgentState::Waiting.post(&comment);
            match self.post_data(&data) {
                Ok(()) => {}
                Err(e) => {
                    log::debug!("cannot post the disk state yet: {e}");
                    self.disk_comment_unposted = Some(comment);
                }
            }
        }
        !low
    }
}

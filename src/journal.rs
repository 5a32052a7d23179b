//! The stderr logger when stderr is the journal: `<N>message` lines (N the
//! syslog priority, so `journalctl -p warning` works) and no timestamp
//! (the journal adds its own). Masked like every other log line.

use std::io::Write;
use std::sync::Mutex;

use log::{LevelFilter, Log, Metadata, Record};
use simplelog::{Config, SharedLogger};

use crate::notify::priority;
use crate::outbound::MaskedLines;

pub struct JournalLogger {
    level: LevelFilter,
    out: Mutex<MaskedLines<std::io::Stderr>>,
}

impl JournalLogger {
    pub fn new(level: LevelFilter) -> Box<JournalLogger> {
        Box::new(JournalLogger { level, out: Mutex::new(MaskedLines::new(std::io::stderr())) })
    }
}

impl Log for JournalLogger {
    fn enabled(&self, m: &Metadata) -> bool {
        // Our own lines only, as the other loggers (no dependency chatter).
        m.level() <= self.level && m.target().starts_with("testflinger_agent")
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // One message, one journal entry: line breaks inside it would start
        // entries without a priority.
        let text = record.args().to_string().replace('\n', " ");
        if let Ok(mut out) = self.out.lock() {
            let _ = writeln!(out, "<{}>{text}", priority(record.level()));
            let _ = out.flush();
        }
    }

    fn flush(&self) {
        if let Ok(mut out) = self.out.lock() {
            let _ = out.flush();
        }
    }
}

impl SharedLogger for JournalLogger {
    fn level(&self) -> LevelFilter {
        self.level
    }

    fn config(&self) -> Option<&Config> {
        None
    }

    fn as_log(self: Box<Self>) -> Box<dyn Log> {
        self
    }
}

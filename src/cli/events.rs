//! The terminal as an events sink: indicatif bars (only on a terminal), notes on stderr, the
//! line that says a server is up.
//!
//! Notes a job logs are held back until it ends and printed only if it succeeded (a failed
//! command's stderr is its one-line error; the task record keeps the notes), except warnings,
//! which are printed either way, and everything after a server is up, which is printed live.

use crate::task::{Events, Level, Outcome, Serving};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// How a command announces that its server is up.
pub type Announce = fn(&Serving) -> String;

pub struct Term {
    bar: Mutex<Option<ProgressBar>>,
    bars: bool,
    json: bool,
    held: Mutex<Vec<(Level, String)>>,
    live: AtomicBool,
    announce: Announce,
}

fn default_announce(s: &Serving) -> String {
    format!("serving {} at {}", s.what, s.at)
}

fn note(level: Level, line: &str) {
    let prefix = match level {
        Level::Info => "",
        Level::Warn => "warning: ",
        Level::Error => "error: ",
    };
    let _ = writeln!(std::io::stderr(), "holdfast: {prefix}{line}");
}

impl Term {
    pub fn new(quiet: bool, json: bool) -> Term {
        Term {
            bar: Mutex::new(None),
            bars: !quiet && !json && std::io::stderr().is_terminal(),
            json,
            held: Mutex::new(Vec::new()),
            live: AtomicBool::new(false),
            announce: default_announce,
        }
    }

    /// Announce servers this way (`mounted … at …`) instead of `serving … at …`.
    pub fn announce(mut self, f: Announce) -> Term {
        self.announce = f;
        self
    }

    fn end_bar(&self) {
        if let Some(pb) = crate::sys::lock(&self.bar).take() {
            pb.finish_and_clear();
        }
    }

    fn flush(&self, all: bool) {
        for (level, line) in crate::sys::lock(&self.held).drain(..) {
            if all || level != Level::Info {
                note(level, &line);
            }
        }
    }
}

impl Events for Term {
    fn phase(&self, name: &str, total: u64) {
        self.end_bar();
        if !self.bars {
            return;
        }
        let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{msg:8} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        pb.set_style(style);
        pb.set_message(name.to_string());
        *crate::sys::lock(&self.bar) = Some(pb);
    }

    fn progress(&self, bytes: u64) {
        if let Some(pb) = crate::sys::lock(&self.bar).as_ref() {
            pb.inc(bytes);
        }
    }

    fn log(&self, level: Level, line: &str) {
        if self.live.load(Ordering::SeqCst) {
            note(level, line);
        } else {
            crate::sys::lock(&self.held).push((level, line.to_string()));
        }
    }

    fn serving(&self, s: &Serving) {
        self.end_bar();
        self.flush(true);
        self.live.store(true, Ordering::SeqCst);
        let mut out = std::io::stdout();
        if self.json {
            let v = serde_json::json!({ "serving": s });
            let _ = writeln!(out, "{v}");
        } else {
            let _ = writeln!(out, "{}", (self.announce)(s));
        }
        let _ = out.flush();
    }

    fn outcome(&self, o: &Outcome) {
        self.end_bar();
        self.flush(o.error.is_none());
    }
}

//! Sizing limits from real traffic: a route with `record:` keeps, per
//! caller and per namespace, what it used each day (requests, tokens,
//! vectors, logprob tokens, logit_bias entries, and the busiest minute's
//! requests and tokens), and writes it to a JSON file every minute (and
//! picks it up again after a restart). Run the route in `mode: shadow` for
//! a few representative days, then `warden limits --record FILE` proposes
//! limits: by default twice the heaviest caller and the heaviest namespace,
//! with who that was and when, so that a budget binds an attacker without
//! touching the honest users it was measured on.
//!
//! Memory is bounded: at most [`MAX_SUBJECTS`] callers and as many
//! namespaces per route (later ones are counted as `unrecorded`), each
//! with at most [`MAX_DAYS`] days.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use warden_config::SpiffeId;

use super::limits::{Ask, Level, Subjects};

/// Most callers (and, separately, namespaces) recorded per route.
pub const MAX_SUBJECTS: usize = 4096;
/// Days kept per caller.
pub const MAX_DAYS: usize = 14;

/// What one caller (or namespace) used on one day (UTC).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Day {
    /// Days since 1970-01-01.
    pub day: u64,
    /// Requests.
    pub requests: u64,
    /// Prompt plus completion tokens.
    pub tokens: u64,
    /// Feature vectors or embeddings.
    pub vectors: u64,
    /// Generated tokens returned with logprobs.
    pub logprob_tokens: u64,
    /// `logit_bias` entries sent.
    pub logit_bias: u64,
    /// Requests in the busiest minute.
    pub peak_requests_per_minute: u64,
    /// Tokens in the busiest minute.
    pub peak_tokens_per_minute: u64,
    /// The largest share of the embedding space the caller had been
    /// answered in (see `detect::answers`; callers only, on embeddings
    /// routes with detection).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub coverage: f64,
    /// The minute being counted, and its counts so far.
    #[serde(default)]
    minute: u64,
    #[serde(default)]
    minute_requests: u64,
    #[serde(default)]
    minute_tokens: u64,
}

impl Day {
    fn add(&mut self, requests: u64, used: &Ask, minute: u64) {
        if minute != self.minute {
            self.minute = minute;
            self.minute_requests = 0;
            self.minute_tokens = 0;
        }
        self.requests += requests;
        self.tokens += used.tokens;
        self.vectors += used.vectors;
        self.logprob_tokens += used.logprob_tokens;
        self.logit_bias += used.logit_bias;
        self.minute_requests += requests;
        self.minute_tokens += used.tokens;
        self.peak_requests_per_minute = self.peak_requests_per_minute.max(self.minute_requests);
        self.peak_tokens_per_minute = self.peak_tokens_per_minute.max(self.minute_tokens);
    }
}

/// Days and minutes since 1970-01-01 (UTC) of `at`.
fn day_and_minute(at: SystemTime) -> (u64, u64) {
    let secs = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    (secs / 86_400, secs / 60)
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// One route's recording: what the file holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Book {
    /// The route.
    pub route: String,
    /// Per SPIFFE ID, its days (oldest first).
    pub callers: BTreeMap<String, Vec<Day>>,
    /// Per namespace, its days.
    pub namespaces: BTreeMap<String, Vec<Day>>,
    /// Requests of callers or namespaces past the bound, not recorded.
    pub unrecorded: u64,
}

impl Book {
    /// Notes that `peer` has been answered in `share` of the embedding space.
    fn cover(&mut self, peer: &SpiffeId, share: f64, at: SystemTime) {
        let (day, _) = day_and_minute(at);
        if let Some(d) = self
            .callers
            .get_mut(peer.as_str())
            .and_then(|days| days.last_mut())
            .filter(|d| d.day == day)
        {
            d.coverage = d.coverage.max(share);
        }
    }

    fn add(&mut self, peer: &SpiffeId, requests: u64, used: &Ask, at: SystemTime) {
        let (day, minute) = day_and_minute(at);
        let subjects = Subjects::of(peer);
        let namespace = subjects.get(Level::Namespace).unwrap_or(peer.as_str());
        for (map, key) in [
            (&mut self.callers, peer.as_str()),
            (&mut self.namespaces, namespace),
        ] {
            if !map.contains_key(key) && map.len() >= MAX_SUBJECTS {
                self.unrecorded += requests;
                continue;
            }
            let days = map.entry(key.to_owned()).or_default();
            if days.last().is_none_or(|d| d.day != day) {
                if days.len() == MAX_DAYS {
                    days.remove(0);
                }
                days.push(Day {
                    day,
                    ..Day::default()
                });
            }
            if let Some(d) = days.last_mut() {
                d.add(requests, used, minute);
            }
        }
    }
}

/// A route's recorder, shared by its requests.
#[derive(Debug)]
pub struct Recorder {
    path: PathBuf,
    book: Mutex<Book>,
}

impl Recorder {
    /// Records `route` into `path`, going on from what the file already
    /// holds (a file that cannot be read is started anew, and said so).
    pub fn new(route: &str, path: &Path) -> Self {
        let book = match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice::<Book>(&bytes) {
                Ok(b) if b.route == route => b,
                _ => {
                    tracing::warn!(route, file = %path.display(), "the recording is not this route's or cannot be read: starting a new one");
                    Book::default()
                }
            },
            Err(_) => Book::default(),
        };
        Self {
            path: path.to_path_buf(),
            book: Mutex::new(Book {
                route: route.to_owned(),
                ..book
            }),
        }
    }

    /// Records one settled request (`requests` is 1 for the rate gate's
    /// ticket, 0 for the budget's, which carries the usage).
    pub fn record(&self, peer: &SpiffeId, requests: u64, used: &Ask) {
        if let Ok(mut b) = self.book.lock() {
            b.add(peer, requests, used, SystemTime::now());
        }
    }

    /// Records the share of the embedding space `peer` has been answered
    /// in (after its request was recorded, so the day is there).
    pub fn record_coverage(&self, peer: &SpiffeId, share: f64) {
        if let Ok(mut b) = self.book.lock() {
            b.cover(peer, share, SystemTime::now());
        }
    }

    /// Writes the recording (to a temporary file, then renamed over it).
    pub fn flush(&self) -> std::io::Result<()> {
        let bytes = match self.book.lock() {
            Ok(b) => serde_json::to_vec_pretty(&*b).map_err(std::io::Error::other)?,
            Err(_) => return Ok(()),
        };
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &self.path)
    }

    /// Flushes every `every` until the task is dropped (the proxy runs it).
    pub async fn keep(self: std::sync::Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(e) = self.flush() {
                tracing::warn!(file = %self.path.display(), error = %e, "cannot write the usage recording");
            }
        }
    }
}

/// One proposed limit: its value and the evidence.
struct Proposal {
    key: &'static str,
    value: String,
    evidence: String,
}

/// Proposes `limits:` for each route in `books` (several files of one route,
/// from several proxies, are added up per caller and day): `headroom` times
/// the heaviest caller (identity level) and the heaviest namespace
/// (namespace level), for every volume that was seen. YAML, with the
/// evidence as comments.
pub fn propose(books: &[Book], headroom: f64) -> String {
    let mut routes: BTreeMap<&str, Book> = BTreeMap::new();
    for b in books {
        let merged = routes.entry(&b.route).or_insert_with(|| Book {
            route: b.route.clone(),
            ..Book::default()
        });
        for (mine, theirs) in [
            (&mut merged.callers, &b.callers),
            (&mut merged.namespaces, &b.namespaces),
        ] {
            for (who, days) in theirs {
                let into = mine.entry(who.clone()).or_default();
                for d in days {
                    match into.iter_mut().find(|x| x.day == d.day) {
                        Some(x) => {
                            x.requests += d.requests;
                            x.tokens += d.tokens;
                            x.vectors += d.vectors;
                            x.logprob_tokens += d.logprob_tokens;
                            x.logit_bias += d.logit_bias;
                            // An upper bound: the busiest minutes may differ.
                            x.peak_requests_per_minute += d.peak_requests_per_minute;
                            x.peak_tokens_per_minute += d.peak_tokens_per_minute;
                            // Each proxy saw part of the answers: the widest is a lower bound.
                            x.coverage = x.coverage.max(d.coverage);
                        }
                        None => into.push(d.clone()),
                    }
                }
            }
        }
        merged.unrecorded += b.unrecorded;
    }
    let mut out = String::new();
    for (route, b) in &routes {
        let days: std::collections::BTreeSet<u64> =
            b.callers.values().flatten().map(|d| d.day).collect();
        let _ = writeln!(
            out,
            "# route {route}: {} callers, {} namespaces over {} days; {headroom}x the heaviest",
            b.callers.len(),
            b.namespaces.len(),
            days.len()
        );
        if b.unrecorded > 0 {
            let _ = writeln!(
                out,
                "# {} requests of callers past the recording's bound were not recorded",
                b.unrecorded
            );
        }
        let _ = writeln!(out, "- name: {route}\n  limits:");
        for (level, map) in [("identity", &b.callers), ("namespace", &b.namespaces)] {
            let found = level_proposals(map, headroom);
            if found.is_empty() {
                continue;
            }
            let _ = writeln!(out, "    {level}:");
            for p in found {
                let _ = writeln!(out, "      {}: {}  # {}", p.key, p.value, p.evidence);
            }
        }
        if let Some(p) = coverage_proposal(&b.callers, headroom) {
            let _ = writeln!(
                out,
                "  detection:\n    {}: {}  # {}",
                p.key, p.value, p.evidence
            );
        }
    }
    out
}

/// `max_coverage` for detection: `headroom` times the breadth of the
/// widest share of the embedding space a caller was answered in (shares
/// saturate; see `detect::answers::breadth`).
fn coverage_proposal(map: &BTreeMap<String, Vec<Day>>, headroom: f64) -> Option<Proposal> {
    let (share, who, day) = map
        .iter()
        .flat_map(|(who, days)| days.iter().map(move |d| (d.coverage, who, d.day)))
        .filter(|(c, _, _)| *c > 0.0)
        .max_by(|a, b| a.0.total_cmp(&b.0))?;
    Some(Proposal {
        key: "max_coverage",
        value: format!("{:.3}", crate::detect::answers::widened(share, headroom)),
        evidence: format!(
            "{headroom}x the breadth of {share:.3} of the embedding space: {who} on {}",
            date(day)
        ),
    })
}

fn level_proposals(map: &BTreeMap<String, Vec<Day>>, headroom: f64) -> Vec<Proposal> {
    type Field = fn(&Day) -> u64;
    let fields: [(&'static str, Field, f64); 6] = [
        ("requests_per_second", |d| d.peak_requests_per_minute, 60.0),
        ("tokens_per_minute", |d| d.peak_tokens_per_minute, 1.0),
        ("tokens_per_day", |d| d.tokens, 1.0),
        ("vectors_per_day", |d| d.vectors, 1.0),
        ("logprob_tokens_per_day", |d| d.logprob_tokens, 1.0),
        ("logit_bias_per_day", |d| d.logit_bias, 1.0),
    ];
    let mut out = Vec::new();
    for (key, field, per) in fields {
        let heaviest = map
            .iter()
            .flat_map(|(who, days)| days.iter().map(move |d| (field(d), who, d.day)))
            .max_by_key(|(v, _, _)| *v);
        let Some((v, who, day)) = heaviest.filter(|(v, _, _)| *v > 0) else {
            continue;
        };
        let value = if per > 1.0 {
            // A rate: the busiest minute, per second, never below 1 in 60.
            format!("{:.3}", (v as f64 * headroom / per).max(1.0 / 60.0))
        } else {
            format!("{}", (v as f64 * headroom).ceil() as u64)
        };
        let unit = if per > 1.0 { " in a minute" } else { "" };
        out.push(Proposal {
            key,
            value,
            evidence: format!("{headroom}x {v}{unit}: {who} on {}", date(day)),
        });
    }
    out
}

/// A day number as YYYY-MM-DD.
fn date(day: u64) -> String {
    let secs = i64::try_from(day.saturating_mul(86_400)).unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(secs)
        .map(|t| t.date().to_string())
        .unwrap_or_else(|_| day.to_string())
}

#[cfg(test)]
#[path = "record_tests.rs"]
mod tests;

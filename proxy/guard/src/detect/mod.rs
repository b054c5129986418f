//! Extraction detection: is this identity copying the model behind us?
//!
//! Every model request is reduced by the proxy to a [`Query`] and recorded
//! against the caller's verified SPIFFE ID. Signals from the literature are
//! computed on the identity's recent queries:
//!
//! - `prada`: PRADA's test on the distances between feature-vector queries
//!   ([`prada`]);
//! - `duplicates` and `sweep`: near-duplicate and systematic-sweep queries
//!   ([`fingerprint`], [`text`] for embedding inputs);
//! - `probing`: logprob / logit_bias probing of an LLM ([`probing`]);
//! - `coverage`: how much of the input or embedding space the identity
//!   covers beyond what natural traffic does, and how many of its queries
//!   are outliers of an operator's reference ([`coverage`], [`natural`]);
//! - `answers`: for embeddings, how much of the embedding space its answers
//!   covered today against the share the operator allows ([`answers`], B4B).
//!
//! Each is in [0, 1] and calibrated to stay at 0 for natural traffic: with
//! a reference, against the rates natural traffic of that very task reaches
//! ([`natural`]), else by fixed thresholds. They
//! combine as independent evidence (`1 - prod(1 - s)`) into one score, and
//! the score climbs the [`Ladder`]. The step is sticky: it never goes down
//! while the identity is remembered (see [`tracker`]).
//!
//! Memory is bounded: at most `max_identities` identities with full state,
//! each at most [`Settings::max_bytes_per_identity`] bytes besides its
//! SPIFFE ID: 20.5 KiB at the defaults, of which 18.6 KiB is the ring of
//! `history` feature vectors (`history` x `sketch_dim` f32) and PRADA's
//! window, 1.2 KiB the text fingerprints, 0.5 KiB an LLM caller's counters;
//! an identity only allocates what its kind of query needs. So 4096
//! identities of a feature-vector API stay under ~90 MiB with their IDs.
//! Add a remembered step for escalated identities that were evicted
//! (at most `max_identities` small entries) and the population's reference
//! (cell counts, projections and a reference's covariance factor, under
//! 400 KiB for 8 input widths).

pub mod answers;
pub mod coverage;
pub mod fingerprint;
pub mod lanes;
pub mod natural;
pub mod prada;
pub mod probing;
pub mod text;
pub mod tracker;
pub mod window;

use std::sync::Arc;

pub use coverage::CoverageSettings;
pub use fingerprint::FingerprintSettings;
pub use prada::PradaSettings;
pub use probing::ProbingSettings;

use answers::{AnswerSpace, Cover};
use coverage::{Population, Space, TEXT_SPACE, Tally};
use fingerprint::FeatureHistory;
use probing::Probing;
use text::TextHistory;
use window::ramp;

/// Thresholds of the escalation ladder, scores in [0,1], non-decreasing
/// warn <= degrade <= refuse <= deny.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ladder {
    /// From here the proxy adds a warning header.
    pub warn: f64,
    /// From here it strips logprobs and coarsens scores.
    pub degrade: f64,
    /// From here it answers 429 abnormal-usage.
    pub refuse: f64,
    /// From here it asks the CA to deny the identity.
    pub deny: f64,
}

impl Default for Ladder {
    fn default() -> Self {
        Self {
            warn: 0.4,
            degrade: 0.6,
            refuse: 0.8,
            deny: 0.95,
        }
    }
}

impl Ladder {
    /// The step a score reaches on its own.
    pub fn step_for(&self, score: f64) -> Step {
        if score >= self.deny {
            Step::Deny
        } else if score >= self.refuse {
            Step::Refuse
        } else if score >= self.degrade {
            Step::Degrade
        } else if score >= self.warn {
            Step::Warn
        } else {
            Step::Normal
        }
    }
}

/// Escalation step; ordered; sticky per tracked identity (never goes down
/// while the identity is tracked).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Step {
    /// Nothing suspicious.
    Normal,
    /// Suspicious: tell the caller (a response header), change nothing else.
    Warn,
    /// Likely extraction: reveal less (no logprobs, coarse scores).
    Degrade,
    /// Extraction: answer 429 abnormal-usage.
    Refuse,
    /// Extraction beyond doubt: have the CA stop renewing the identity.
    Deny,
}

impl Step {
    /// The lowercase name, for metric labels and logs.
    pub fn label(self) -> &'static str {
        match self {
            Step::Normal => "normal",
            Step::Warn => "warn",
            Step::Degrade => "degrade",
            Step::Refuse => "refuse",
            Step::Deny => "deny",
        }
    }
}

/// Everything the detector can be tuned by; the defaults are what the
/// evaluation harness (`cargo bench --bench extraction`) was run with.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Cap on tracked identities; least recently seen is evicted.
    pub max_identities: usize,
    /// Cap on remembered queries per identity (ring).
    pub history: usize,
    /// Escalation thresholds.
    pub ladder: Ladder,
    /// The LLM's hidden size to protect (e.g. 4096): a probing identity must
    /// be stopped well before it has this many full logprob vectors.
    pub hidden_size: u32,
    /// Feature inputs wider than this are ignored beyond it for the memory
    /// bound's sake (they are folded into `fingerprint.sketch_dim` anyway).
    pub max_features: usize,
    /// PRADA's distance test.
    pub prada: PradaSettings,
    /// Near duplicates and sweeps.
    pub fingerprint: FingerprintSettings,
    /// LLM probing.
    pub probing: ProbingSettings,
    /// Space coverage.
    pub coverage: CoverageSettings,
    /// The share of the embedding space's buckets (see [`answers`]) an
    /// identity may be answered in before it is refused; 0: not bounded
    /// (the share is still measured, for recordings).
    pub max_coverage: f64,
    /// Lock shards (more shards, less contention between connections).
    pub shards: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_identities: 4096,
            history: 128,
            ladder: Ladder::default(),
            hidden_size: 4096,
            max_features: 65_536,
            prada: PradaSettings::default(),
            fingerprint: FingerprintSettings::default(),
            probing: ProbingSettings::default(),
            coverage: CoverageSettings::default(),
            max_coverage: 0.0,
            shards: 32,
        }
    }
}

impl Settings {
    /// Upper bound of the bytes one tracked identity holds, besides its
    /// SPIFFE ID (at most 2048 bytes) and map overhead: the feature ring
    /// (`history` x `sketch_dim` f32), PRADA's window, the text ring
    /// (`history` u64), the LLM counters and the flag windows.
    pub fn max_bytes_per_identity(&self) -> usize {
        std::mem::size_of::<Identity>()
            + FeatureHistory::max_bytes(
                self.fingerprint.sketch_dim,
                self.history,
                self.prada.window,
                &self.fingerprint,
            )
            + TextHistory::max_bytes(self.history, &self.fingerprint)
            + Probing::max_bytes(&self.probing)
            + Cover::BYTES
            + 3 * self.coverage.window
    }
}

/// What one request reveals, as the proxy parsed it from the request body.
#[derive(Debug, Clone, Copy)]
pub enum Query<'a> {
    /// A generic predict API call: one numeric feature vector (a request
    /// with several instances is several queries).
    Features(&'a [f64]),
    /// An OpenAI-compatible chat/completions call.
    Llm(LlmQuery<'a>),
    /// An OpenAI-compatible embeddings call: the input texts.
    Embeddings(&'a [&'a str]),
}

/// The parts of a chat/completions request that matter for probing.
#[derive(Debug, Clone, Copy)]
pub struct LlmQuery<'a> {
    /// The prompt / messages' text concatenated.
    pub prompt: &'a str,
    /// Whether logprobs were asked for.
    pub logprobs: bool,
    /// `top_logprobs`, 0 when not asked.
    pub top_logprobs: u32,
    /// `logit_bias` entries: token id, bias.
    pub logit_bias: &'a [(u32, f64)],
    /// `max_tokens` (or `max_completion_tokens`).
    pub max_tokens: u32,
}

/// The detector's view of one identity after a query.
#[derive(Debug, Clone, PartialEq)]
pub struct Assessment {
    /// Combined suspicion in [0, 1].
    pub score: f64,
    /// The (sticky) escalation step.
    pub step: Step,
    /// The signals the score combines.
    pub signals: Signals,
}

/// Each signal in [0,1], for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Signals {
    /// PRADA's distance-distribution test.
    pub prada: f64,
    /// Near-duplicate queries.
    pub duplicates: f64,
    /// Systematic sweeps (sparse changes, sign steps, line searches).
    pub sweep: f64,
    /// LLM logprob / logit_bias probing.
    pub probing: f64,
    /// Coverage of the input / embedding space beyond natural traffic's.
    pub coverage: f64,
    /// Today's share of the embedding space the caller's answers covered,
    /// against the share allowed (`max_coverage`; see [`answers`]).
    pub answers: f64,
}

impl Signals {
    /// Independent evidence: `1 - prod(1 - s)`.
    pub fn combined(&self) -> f64 {
        let s = [
            self.prada,
            self.duplicates,
            self.sweep,
            self.probing,
            self.coverage,
            self.answers,
        ];
        let p: f64 = s
            .iter()
            .map(|v| {
                1.0 - if v.is_finite() {
                    v.clamp(0.0, 1.0)
                } else {
                    0.0
                }
            })
            .product();
        (1.0 - p).clamp(0.0, 1.0)
    }
}

/// One identity's state.
#[derive(Debug)]
struct Identity {
    step: Step,
    taught: u32,
    score: f64,
    signals: Signals,
    features: Option<Box<FeatureHistory>>,
    feature_space: Option<Arc<Space>>,
    feature_cover: Option<Box<Tally>>,
    texts: Option<Box<TextHistory>>,
    text_cover: Option<Box<Tally>>,
    answered: Option<Box<Cover>>,
    llm: Option<Box<Probing>>,
}

impl tracker::Tracked for Identity {
    fn starting_at(step: Step) -> Self {
        Self {
            step,
            taught: 0,
            score: 0.0,
            signals: Signals::default(),
            features: None,
            feature_space: None,
            feature_cover: None,
            texts: None,
            text_cover: None,
            answered: None,
            llm: None,
        }
    }

    fn step(&self) -> Step {
        self.step
    }
}

/// One per route, shared by its connections: Send + Sync, internally
/// sharded locks (short critical sections), bounded memory.
pub struct Detector {
    settings: Settings,
    tracker: tracker::Tracker<Identity>,
    population: Population,
    answers: AnswerSpace,
    sw: prada::Table,
}

impl std::fmt::Debug for Detector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detector")
            .field("settings", &self.settings)
            .field("tracked", &self.tracked())
            .field("population", &self.population)
            .finish()
    }
}

impl Detector {
    /// A detector with no identities yet.
    pub fn new(settings: Settings) -> Self {
        let sw = prada::Table::new(settings.prada.window.max(3));
        Self {
            tracker: tracker::Tracker::new(settings.max_identities, settings.shards),
            population: Population::default(),
            answers: AnswerSpace::default(),
            sw,
            settings,
        }
    }

    /// Defines natural traffic for feature vectors of the `rows`' width by an
    /// operator's reference (see [`Space::seed`](coverage::Space::seed)):
    /// the coverage and typical-distance signals count from the first query,
    /// and no caller teaches them.
    pub fn seed(&self, rows: &[Vec<f64>]) {
        let Some(dim) = rows.first().map(Vec::len).filter(|d| *d > 0) else {
            return;
        };
        let s = &self.settings;
        let k = s.fingerprint.width(dim);
        let Some(space) = self.population.space(dim, k, &s.coverage) else {
            return;
        };
        let rows: Vec<&[f64]> = rows
            .iter()
            .map(Vec::as_slice)
            .filter(|r| r.len() == dim)
            .collect();
        let sketched: Vec<Vec<f64>> = rows
            .iter()
            .map(|r| {
                let mut v = Vec::with_capacity(k);
                fingerprint::sketch(r, k, &mut v);
                v
            })
            .collect();
        space.seed(&sketched, s.history);
        let nat = natural::Natural::measure(
            &rows,
            &sketched,
            s.history,
            space.typical_nearest(),
            &s.fingerprint,
            &s.prada,
            &self.sw,
        );
        space.calibrate(nat);
    }

    /// Defines natural embedding inputs by an operator's reference of texts
    /// (see [`Space::seed_texts`](coverage::Space::seed_texts)): the text
    /// coverage signal counts from the first query, and no caller teaches it.
    pub fn seed_texts(&self, texts: &[String]) {
        let Some(space) = self
            .population
            .space(TEXT_SPACE, 0, &self.settings.coverage)
        else {
            return;
        };
        let hashes: Vec<u64> = texts.iter().map(|t| text::simhash(t)).collect();
        space.seed_texts(&hashes);
    }

    /// Records one query by `identity` (a SPIFFE ID string) and returns its
    /// assessment.
    pub fn observe(&self, identity: &str, query: Query<'_>) -> Assessment {
        self.tracker.with(identity, |id| {
            match query {
                Query::Features(x) => self.features(id, x),
                Query::Llm(q) => self.llm(id, &q),
                Query::Embeddings(texts) => self.texts(id, texts),
            }
            self.assess(id)
        })
    }

    /// Records the embeddings `identity` was answered (all of one width)
    /// and returns its assessment and the share of the embedding space it
    /// has been answered in today (UTC); None when there is nothing to
    /// measure, or anything that cannot be: embeddings of differing widths,
    /// wider than [`answers::MAX_WIDTH`], or not finite.
    pub fn observe_answer(
        &self,
        identity: &str,
        embeddings: &[Vec<f32>],
    ) -> Option<(Assessment, f64)> {
        let width = embeddings.first()?.len();
        if embeddings
            .iter()
            .any(|e| e.len() != width || !e.iter().all(|x| x.is_finite()))
        {
            return None;
        }
        let normals = self.answers.normals(width)?;
        // The projection runs outside the identity's lock.
        let buckets: Vec<_> = embeddings
            .iter()
            .map(|e| answers::buckets(&normals, e))
            .collect();
        let day = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() / 86_400);
        Some(self.tracker.with(identity, |id| {
            let cover = id.answered.get_or_insert_with(Box::default);
            cover.on(day);
            for b in buckets {
                cover.add(b);
            }
            let share = cover.share();
            let s = &self.settings;
            id.signals.answers = answers::signal(share, s.max_coverage, s.ladder.refuse);
            (self.assess(id), share)
        }))
    }

    /// Whether answers' embeddings are bounded (`max_coverage`): an answer
    /// that cannot be measured must then not be delivered.
    pub fn bounds_answers(&self) -> bool {
        self.settings.max_coverage > 0.0
    }

    /// Scores the identity's signals and moves its (sticky) step.
    fn assess(&self, id: &mut Identity) -> Assessment {
        id.score = id.signals.combined();
        id.step = id.step.max(self.settings.ladder.step_for(id.score));
        Assessment {
            score: id.score,
            step: id.step,
            signals: id.signals,
        }
    }

    /// The identity's current step without recording anything (Normal when
    /// untracked; an escalated identity that was evicted keeps its step).
    pub fn step(&self, identity: &str) -> Step {
        self.tracker.step(identity)
    }

    /// Identities tracked now (for a gauge).
    pub fn tracked(&self) -> usize {
        self.tracker.len()
    }

    /// Whether this identity's queries may teach the population what natural
    /// traffic looks like: only while nothing is suspected of it.
    /// Each identity teaches at most `coverage.teach` queries, so that no
    /// single caller (an undetected attacker, a heavy user) defines what
    /// natural looks like.
    fn natural(&self, id: &Identity) -> bool {
        id.step == Step::Normal
            && id.score < self.settings.ladder.warn / 2.0
            && id.taught < self.settings.coverage.teach
    }

    fn features(&self, id: &mut Identity, x: &[f64]) {
        let s = &self.settings;
        // Values are kept in f32: a larger one would become infinite there,
        // and one infinity in a warm-up mean would blind every caller.
        let representable = |v: &f64| v.is_finite() && v.abs() <= f64::from(f32::MAX);
        if x.is_empty() || x.len() > s.max_features || !x.iter().all(representable) {
            return;
        }
        let fresh = || {
            Box::new(FeatureHistory::new(
                x.len(),
                s.history,
                s.prada.window,
                &s.fingerprint,
            ))
        };
        let hist = id.features.get_or_insert_with(fresh);
        if hist.dim() != x.len() {
            // Another model behind the same listener: start over for it.
            *hist = fresh();
            id.feature_space = None;
            id.feature_cover = None;
        }
        let k = s.fingerprint.width(x.len());
        if id.feature_space.is_none() {
            id.feature_space = self.population.space(x.len(), k, &s.coverage);
        }
        let natural = self.natural(id);
        let Some(hist) = id.features.as_mut() else {
            return;
        };
        // Only a reference says what a natural nearest distance is: learnt
        // from live callers it would be taught by the ones being judged
        // (an undetected crawler's large distances make honest ones look
        // near).
        let typical = id
            .feature_space
            .as_ref()
            .and_then(|space| space.typical_nearest());
        let rel = hist.observe(x, typical, &s.fingerprint);

        let fp = &s.fingerprint;
        let nat = id.feature_space.as_ref().and_then(|space| space.natural());
        let (dup_ramp, sweep_ramp) = match nat {
            Some(n) => (
                natural::lifted(fp.duplicates, n.duplicate_rate, fp.window),
                natural::lifted(fp.sweeps, n.sweep_rate, fp.window),
            ),
            None => (fp.duplicates, fp.sweeps),
        };
        if hist.flags.len() >= fp.min_queries {
            id.signals.duplicates = ramp(hist.duplicate_fraction(fp.min_queries), dup_ramp);
            id.signals.sweep = ramp(hist.sweep_fraction(fp.min_queries), sweep_ramp);
        }
        if let Some(w) = prada::trimmed_w(&hist.distances, &s.prada, &self.sw) {
            // Natural traffic of this task reaches `w_floor`: the ramp is
            // moved down to start below it.
            let shift = nat
                .and_then(|n| n.w_floor)
                .map_or(0.0, |f| (s.prada.w_ok - (f - prada::FLOOR_MARGIN)).max(0.0));
            id.signals.prada = prada::signal(w, s.prada.w_alarm - shift, s.prada.w_ok - shift);
        }

        // Coverage: only new information counts (an exact repeat is skipped).
        if rel.is_none() {
            return;
        }
        let Some(space) = id.feature_space.as_ref() else {
            return;
        };
        let v = hist.sketched();
        let mut cells = [0usize; 8];
        let n = space.cells(v, &mut cells);
        if natural {
            space.learn(v, n.map(|n| (&cells, n)));
            id.taught += 1;
        }
        let rare = n.and_then(|n| space.is_rare(&cells, n));
        let outlying = space.natural().and_then(|nat| nat.outlying(v));
        if rare.is_some() || outlying.is_some() {
            let tally = id
                .feature_cover
                .get_or_insert_with(|| Box::new(Tally::new(&s.coverage)));
            tally.push(rare == Some(true), outlying == Some(true));
            id.signals.coverage = tally.signal(space.rare_mass(), space.natural(), &s.coverage);
        }
    }

    fn texts(&self, id: &mut Identity, texts: &[&str]) {
        let s = &self.settings;
        let natural = self.natural(id);
        let space = self.population.space(TEXT_SPACE, 0, &s.coverage);
        let hist = id
            .texts
            .get_or_insert_with(|| Box::new(TextHistory::new(s.history, &s.fingerprint)));
        let tally = id
            .text_cover
            .get_or_insert_with(|| Box::new(Tally::new(&s.coverage)));
        let mut cells = [0usize; 8];
        for t in texts {
            let h = text::simhash(t);
            let before = hist.repeats;
            hist.observe(h, &s.fingerprint);
            if hist.repeats != before {
                continue;
            }
            if let Some(space) = space.as_ref() {
                let n = space.text_cells(h, &mut cells);
                if natural && id.taught < s.coverage.teach {
                    space.learn(&[], Some((&cells, n)));
                    id.taught += 1;
                }
                if let Some(rare) = space.is_rare(&cells, n) {
                    tally.push(rare, false);
                }
            }
        }
        let fp = &s.fingerprint;
        if hist.flags.len() >= fp.min_queries {
            id.signals.duplicates = id
                .signals
                .duplicates
                .max(ramp(hist.duplicate_fraction(fp.min_queries), fp.duplicates));
        }
        if let Some(space) = space.as_ref() {
            id.signals.coverage =
                id.signals
                    .coverage
                    .max(tally.signal(space.rare_mass(), None, &s.coverage));
        }
    }

    fn llm(&self, id: &mut Identity, q: &LlmQuery<'_>) {
        let s = &self.settings;
        let p = id
            .llm
            .get_or_insert_with(|| Box::new(Probing::new(&s.probing)));
        p.observe(
            q.logprobs,
            q.top_logprobs,
            q.logit_bias,
            q.max_tokens,
            &s.probing,
        );
        id.signals.probing = p.signal(s.hidden_size, &s.probing);
    }
}

#[cfg(test)]
mod tests;

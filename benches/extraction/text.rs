//! The embeddings route: can a crawler copy an encoder through warden?
//!
//! Stealing an encoder takes its embeddings of texts that cover the space
//! (Sha et al. 2023, StolenEncoder; Dziedzic et al. 2023, B4B). The victim's
//! users are narrow: an indexer embeds its own corpus, a search service its
//! users' questions, each about a few topics. A crawler is broad. As in B4B,
//! what a caller has taken is measured as its coverage of the embedding
//! space: the share of locality-sensitive buckets of the embeddings it was
//! answered, with an encoder of the harness's own (hashed bag of content
//! words, 12 random hyperplanes: 4,096 buckets) that warden never sees.
//!
//! Texts come from generated topic corpora (no download): 24 topics the
//! route's users write about, each with its own vocabulary of pseudo-words
//! besides common English function words, and 24 other topics for the
//! crawler that brings its own public corpus. The route's operator supplies
//! a reference of 2,000 natural texts.
//!
//! Crawlers (20,000 texts each, 32 per request, from the first second):
//! `in-domain` (texts of all the users' topics), `public` (other topics),
//! `template` (an instruction and one to three words, the classic
//! vocabulary sweep), each plain and `mixed` (every other request one
//! topic's texts, as an indexer would send).

use std::collections::HashSet;
use std::path::Path;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

use warden_config::{ProxyConfig, SpiffeId};
use warden_guard::detect::{Detector, Query, Settings, Step};
use warden_guard::limits::local::LocalStore;
use warden_guard::limits::{Ask, Plan, Subjects};
use warden_guard::record::{Book, Recorder, propose};

use crate::traffic::DAY_MS;
use crate::{gauss, mark};

const TOPICS: usize = 24;
const WORDS_PER_TOPIC: usize = 150;
const BATCH: usize = 32;
const CRAWL_BUDGET: usize = 20_000;
const DIM: usize = 256;
const PLANES: usize = 12;
const FUNCTION: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "for", "on", "with", "as", "by", "at", "from", "that",
    "this", "it", "be", "are", "was", "or", "an", "which", "can", "has", "not", "we", "our",
    "their", "these", "its", "when", "how", "what", "into", "after", "before", "about",
];

/// Topic vocabularies: pseudo-words of two to four syllables.
struct Corpus {
    topics: Vec<Vec<String>>,
}

impl Corpus {
    fn new(topics: usize, rng: &mut StdRng) -> Self {
        const ONSETS: &[&str] = &[
            "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br",
            "st", "tr", "pl", "gr", "sh", "th", "ch",
        ];
        const VOWELS: &[&str] = &["a", "e", "i", "o", "u", "ai", "ou", "ea"];
        let word = |rng: &mut StdRng| -> String {
            (0..rng.random_range(2..=4))
                .map(|_| {
                    format!(
                        "{}{}",
                        ONSETS.choose(rng).unwrap(),
                        VOWELS.choose(rng).unwrap()
                    )
                })
                .collect()
        };
        Self {
            topics: (0..topics)
                .map(|_| (0..WORDS_PER_TOPIC).map(|_| word(rng)).collect())
                .collect(),
        }
    }

    /// One text about `topic`: function words and the topic's words, Zipf.
    fn text(&self, topic: usize, rng: &mut StdRng) -> String {
        let len = rng.random_range(8..=30);
        let words = &self.topics[topic];
        (0..len)
            .map(|_| {
                if rng.random::<f64>() < 0.45 {
                    *FUNCTION.choose(rng).unwrap()
                } else {
                    words[zipf(words.len(), rng)].as_str()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// A Zipf(1) index below `n`.
fn zipf(n: usize, rng: &mut StdRng) -> usize {
    let h = (n as f64).ln() + 0.577;
    ((rng.random::<f64>() * h).exp() - 1.0).clamp(0.0, n as f64 - 1.0) as usize
}

/// The harness's encoder and its buckets (what coverage is measured by).
struct Buckets {
    planes: Vec<[f64; DIM]>,
    mean: [f64; DIM],
}

impl Buckets {
    fn new(natural: &[String], rng: &mut StdRng) -> Self {
        let planes = (0..PLANES)
            .map(|_| std::array::from_fn(|_| gauss(rng)))
            .collect();
        let mut mean = [0.0; DIM];
        for t in natural {
            for (m, v) in mean.iter_mut().zip(embed(t)) {
                *m += v / natural.len() as f64;
            }
        }
        Self { planes, mean }
    }

    fn bucket(&self, text: &str) -> u16 {
        let e = embed(text);
        self.planes.iter().enumerate().fold(0u16, |b, (i, p)| {
            let dot: f64 = p
                .iter()
                .zip(e.iter().zip(&self.mean))
                .map(|(w, (x, m))| w * (x - m))
                .sum();
            if dot > 0.0 { b | 1 << i } else { b }
        })
    }

    fn coverage(set: &HashSet<u16>) -> f64 {
        set.len() as f64 / f64::from(1u32 << PLANES)
    }
}

/// The victim's answer to `text`: its embedding, as the model sends it.
fn answer(text: &str) -> Vec<f32> {
    embed(text).iter().map(|x| *x as f32).collect()
}

/// Hashed bag of content words, unit length.
fn embed(text: &str) -> [f64; DIM] {
    let mut v = [0.0; DIM];
    for w in text.split(' ').filter(|w| !FUNCTION.contains(w)) {
        let h = w.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        v[(h % DIM as u64) as usize] += if h >> 63 == 1 { 1.0 } else { -1.0 };
    }
    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-9);
    v.map(|x| x / n)
}

/// Someone calling the route: the texts of its requests, in order.
struct Caller {
    id: String,
    /// What it is, for the report.
    label: (&'static str, &'static str),
    requests: Vec<Vec<String>>,
    /// Texts it was answered.
    taken: HashSet<u16>,
    first: [Option<usize>; 5],
    sent: usize,
    answered: usize,
}

impl Caller {
    fn new(id: String, label: (&'static str, &'static str), requests: Vec<Vec<String>>) -> Self {
        Self {
            id,
            label,
            requests,
            taken: HashSet::new(),
            first: [None; 5],
            sent: 0,
            answered: 0,
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Crawl {
    InDomain,
    Public,
    Template,
}

impl Crawl {
    fn label(self) -> &'static str {
        match self {
            Crawl::InDomain => "in-domain",
            Crawl::Public => "public",
            Crawl::Template => "template",
        }
    }
}

fn crawler(kind: Crawl, mixed: bool, seed: u64, users: &Corpus, public: &Corpus) -> Caller {
    let mut rng = StdRng::seed_from_u64(seed);
    let own = rng.random_range(0..TOPICS);
    let all: Vec<&String> = users.topics.iter().flatten().collect();
    let requests = (0..CRAWL_BUDGET / BATCH)
        .map(|r| {
            (0..BATCH)
                .map(|_| {
                    if mixed && r % 2 == 1 {
                        return users.text(own, &mut rng);
                    }
                    match kind {
                        Crawl::InDomain => users.text(rng.random_range(0..TOPICS), &mut rng),
                        Crawl::Public => public.text(rng.random_range(0..TOPICS), &mut rng),
                        Crawl::Template => {
                            let words: Vec<&str> = (0..rng.random_range(1..=3))
                                .map(|_| all.choose(&mut rng).unwrap().as_str())
                                .collect();
                            format!(
                                "Represent this sentence for searching relevant passages: {}",
                                words.join(" ")
                            )
                        }
                    }
                })
                .collect()
        })
        .collect();
    let variant = if mixed { "mixed" } else { "plain" };
    // Each in a namespace of its own: its identity's budget binds it.
    Caller::new(
        format!(
            "spiffe://bench.test/ns/crawl-{}-{variant}-{seed}/sa/crawler",
            kind.label()
        ),
        (kind.label(), variant),
        requests,
    )
}

/// Honest callers: indexers (3,000 to 6,000 texts of one or two topics, in
/// batches, with re-indexed duplicates) and search users (single short
/// questions about one to three topics, with retries).
fn honest(users: &Corpus, rng: &mut StdRng) -> Vec<Caller> {
    let mut out = Vec::new();
    for i in 0..3 {
        let topics: Vec<usize> = (0..1 + i % 2)
            .map(|_| rng.random_range(0..TOPICS))
            .collect();
        let n = rng.random_range(3_000..6_000);
        let mut docs: Vec<String> = (0..n)
            .map(|_| users.text(*topics.choose(rng).unwrap(), rng))
            .collect();
        // Re-indexing: a tenth of the corpus is sent again.
        let again: Vec<String> = docs[..n / 10].to_vec();
        docs.extend(again);
        let requests = docs.chunks(BATCH).map(<[String]>::to_vec).collect();
        out.push(Caller::new(
            format!("spiffe://bench.test/ns/docs/sa/indexer-{i}"),
            ("indexer", ""),
            requests,
        ));
    }
    for i in 0..12 {
        let topics: Vec<usize> = (0..rng.random_range(1..=3))
            .map(|_| rng.random_range(0..TOPICS))
            .collect();
        let n = (80.0 * (0.8 * gauss(rng)).exp()).clamp(5.0, 1_500.0) as usize;
        let mut requests: Vec<Vec<String>> = Vec::new();
        for _ in 0..n {
            if !requests.is_empty() && rng.random::<f64>() < 0.05 {
                let last = requests.last().unwrap().clone();
                requests.push(last);
                continue;
            }
            let t = users.text(*topics.choose(rng).unwrap(), rng);
            let short: Vec<&str> = t.split(' ').take(rng.random_range(4..=10)).collect();
            requests.push(vec![short.join(" ")]);
        }
        out.push(Caller::new(
            format!("spiffe://bench.test/ns/search/sa/user-{i}"),
            ("search", ""),
            requests,
        ));
    }
    out
}

/// How the route is deployed.
struct Deploy {
    label: &'static str,
    reference: bool,
    /// The budget `warden limits` proposed from a shadow-mode day.
    budget: Option<(Plan, LocalStore)>,
    /// The `max_coverage` it proposed (0: none).
    max_coverage: f64,
}

/// Sybils: identities of one namespace, each crawling in-domain.
const SYBILS: usize = 10;

/// The route's texts: the users' topics, the public corpus, a reference.
fn corpora(rng: &mut StdRng) -> (Corpus, Corpus, Vec<String>) {
    let users = Corpus::new(TOPICS, rng);
    let public = Corpus::new(TOPICS, rng);
    let reference = (0..2_000)
        .map(|_| users.text(rng.random_range(0..TOPICS), rng))
        .collect();
    (users, public, reference)
}

/// A shadow-mode day of honest traffic recorded as the proxy records it,
/// and the `limits:` that `warden limits --headroom 2` proposes from it,
/// compiled as the proxy compiles them: the evidence and the budget.
fn proposed_budget() -> (String, Plan, f64) {
    let mut rng = StdRng::seed_from_u64(0x5ad0);
    let (users, _, _) = corpora(&mut rng);
    let path = std::env::temp_dir().join(format!("warden-harness-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let recorder = Recorder::new("embed", &path);
    // Shadow mode: detection measures, nothing is refused.
    let shadow = Detector::new(Settings::default());
    for c in honest(&users, &mut rng) {
        let peer = SpiffeId::parse(&c.id).unwrap();
        for r in &c.requests {
            let used = Ask {
                vectors: r.len() as u64,
                ..Ask::default()
            };
            recorder.record(&peer, 0, &used);
            let answers: Vec<Vec<f32>> = r.iter().map(|t| answer(t)).collect();
            if let Some((_, share)) = shadow.observe_answer(&c.id, &answers) {
                recorder.record_coverage(&peer, share);
            }
        }
    }
    recorder.flush().unwrap();
    let book: Book = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let _ = std::fs::remove_file(&path);
    let proposal = propose(&[book], 2.0);
    let limits: String = proposal
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("limits:"))
        .map(|l| format!("      {l}\n"))
        .collect();
    let config = format!(
        "identity: {{cert: c, key: k, bundle: b}}\nadmin: 127.0.0.1:1\ninbound:\n  - name: models\n    listen: 127.0.0.1:2\n    app: 127.0.0.1:3\n    model_api:\n      - name: embed\n        paths: [/v1/embeddings]\n        api: openai\n{limits}"
    );
    let cfg = ProxyConfig::parse(Path::new("proposed.yaml"), &config)
        .unwrap_or_else(|e| panic!("the proposal does not parse: {e:?}\n{config}"));
    let route = &cfg.inbound[0].model_api[0];
    let (_, budget) = Plan::new("embed", &route.limits).split();
    let max_coverage = route
        .detection
        .as_ref()
        .and_then(|d| d.max_coverage)
        .expect("the proposal names a max_coverage");
    (proposal, budget, max_coverage)
}

/// Runs the route in each deployment and prints the report.
pub fn run(settings: &Settings, seeds: u64) {
    println!(
        "\n## Embeddings route: encoder crawlers ({CRAWL_BUDGET} texts, {BATCH} per request) next to indexers and search users\n"
    );
    println!(
        "coverage: share of the harness encoder's {} buckets a caller was answered in (B4B)\n",
        1u32 << PLANES
    );
    let (proposal, plan, max_coverage) = proposed_budget();
    println!(
        "`warden limits --headroom 2` on a recorded shadow-mode day of the honest callers:\n\n```\n{}```\n",
        proposal
    );
    let deploys = [
        Deploy {
            label: "with a reference",
            reference: true,
            budget: None,
            max_coverage: 0.0,
        },
        Deploy {
            label: "no reference",
            reference: false,
            budget: None,
            max_coverage: 0.0,
        },
        Deploy {
            label: "with a reference and the proposed max_coverage",
            reference: true,
            budget: None,
            max_coverage,
        },
        Deploy {
            label: "with a reference, the proposed budget and max_coverage",
            reference: true,
            budget: Some((plan, LocalStore::new(4096))),
            max_coverage,
        },
    ];
    for deploy in &deploys {
        day(settings, seeds, deploy);
    }
}

fn day(settings: &Settings, seeds: u64, deploy: &Deploy) {
    let mut rng = StdRng::seed_from_u64(0x7e57);
    let (users, public, reference) = corpora(&mut rng);
    let buckets = Buckets::new(&reference, &mut rng);
    let detector = Detector::new(Settings {
        max_coverage: deploy.max_coverage,
        ..settings.clone()
    });
    if deploy.reference {
        detector.seed_texts(&reference);
    }
    let mut callers = honest(&users, &mut rng);
    let honest_count = callers.len();
    for kind in [Crawl::InDomain, Crawl::Public, Crawl::Template] {
        for mixed in [false, true] {
            for s in 0..seeds {
                callers.push(crawler(kind, mixed, 500 + s, &users, &public));
            }
        }
    }
    // Sybils: identities of one namespace, each with a whole crawler's
    // budget of in-domain texts.
    let sybil_from = callers.len();
    for i in 0..SYBILS {
        let mut c = crawler(Crawl::InDomain, false, 900 + i as u64, &users, &public);
        c.id = format!("spiffe://bench.test/ns/sybil/sa/worker-{i}");
        c.label = ("sybil", "split");
        callers.push(c);
    }
    // Everyone sends all day, crawlers from the first second.
    let mut order: Vec<(f64, usize, usize)> = Vec::new();
    for (c, caller) in callers.iter().enumerate() {
        let n = caller.requests.len();
        let start = if c < honest_count {
            rng.random::<f64>() * 0.3
        } else {
            0.0
        };
        for r in 0..n {
            order.push((start + (1.0 - start) * r as f64 / n as f64, c, r));
        }
    }
    order.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut honest_requests, mut refused_honest, mut over_budget_honest) =
        (0usize, 0usize, 0usize);
    let mut over_budget = vec![false; callers.len()];
    for &(at, c, r) in &order {
        let crawling = c >= honest_count;
        let caller = &mut callers[c];
        if crawling && (caller.first[3].is_some() || over_budget[c]) {
            continue; // A refused crawler stops.
        }
        let texts: Vec<&str> = caller.requests[r].iter().map(String::as_str).collect();
        honest_requests += usize::from(!crawling);
        if let Some((plan, store)) = &deploy.budget {
            let who = Subjects::of(&SpiffeId::parse(&caller.id).unwrap());
            let ask = Ask {
                vectors: texts.len() as u64,
                ..Ask::default()
            };
            let now_us = (at * DAY_MS as f64 * 1000.0) as u64;
            if store.admit(plan, &who, &ask, now_us).is_err() {
                over_budget[c] = true;
                over_budget_honest += usize::from(!crawling);
                continue;
            }
        }
        let a = detector.observe(&caller.id, Query::Embeddings(&texts));
        caller.sent += texts.len();
        mark(&mut caller.first, a.step, caller.sent);
        if a.step >= Step::Refuse {
            refused_honest += usize::from(!crawling);
            continue;
        }
        // warden measures the answer before it is delivered, and withholds
        // one that takes its caller to refuse.
        let answers: Vec<Vec<f32>> = texts.iter().map(|t| answer(t)).collect();
        if let Some((a, _)) = detector.observe_answer(&caller.id, &answers) {
            mark(&mut caller.first, a.step, caller.sent);
            if a.step >= Step::Refuse {
                refused_honest += usize::from(!crawling);
                continue;
            }
        }
        caller.answered += texts.len();
        for t in &texts {
            caller.taken.insert(buckets.bucket(t));
        }
    }
    let widest = |cs: &[Caller]| {
        cs.iter()
            .map(|c| Buckets::coverage(&c.taken))
            .fold(0.0, f64::max)
    };
    let indexer = widest(&callers[..3]);
    println!(
        "### {}; honest: widest indexer covers {:.3}, widest search user {:.3}; honest requests refused {refused_honest}, over budget {over_budget_honest}, of {honest_requests}\n",
        deploy.label,
        indexer,
        widest(&callers[3..honest_count]),
    );
    println!(
        "{:<10} {:<7} {:>9} {:>6} {:>7} {:>9} {:>9} {:>10}",
        "crawler", "variant", "detected", "warn", "refuse", "answered", "coverage", "x indexer"
    );
    let show = |f: Option<usize>| f.map_or("-".to_string(), |n| n.to_string());
    for c in &callers[honest_count..sybil_from] {
        let cov = Buckets::coverage(&c.taken);
        let (kind, variant) = c.label;
        println!(
            "{:<10} {:<7} {:>9} {:>6} {:>7} {:>9} {:>9.3} {:>10.2}",
            kind,
            variant,
            if c.first[3].is_some() { "yes" } else { "no" },
            show(c.first[1]),
            show(c.first[3]),
            c.answered,
            cov,
            cov / indexer.max(1e-9)
        );
    }
    let sybils = &callers[sybil_from..];
    let mut union: HashSet<u16> = HashSet::new();
    for c in sybils {
        union.extend(&c.taken);
    }
    let cov = Buckets::coverage(&union);
    println!(
        "{:<10} {:<7} {:>9} {:>6} {:>7} {:>9} {:>9.3} {:>10.2}",
        format!("{SYBILS} sybils"),
        "one ns",
        format!(
            "{}/{}",
            sybils.iter().filter(|c| c.first[3].is_some()).count(),
            sybils.len()
        ),
        "",
        "",
        sybils.iter().map(|c| c.answered).sum::<usize>(),
        cov,
        cov / indexer.max(1e-9)
    );
    let warned: Vec<String> = callers[..honest_count]
        .iter()
        .filter(|c| c.first[1].is_some())
        .map(|c| {
            format!(
                "{} warn@{}",
                c.id.rsplit('/').next().unwrap_or(""),
                show(c.first[1])
            )
        })
        .collect();
    println!(
        "honest callers warned: {}\n",
        if warned.is_empty() {
            "none".to_string()
        } else {
            warned.join(", ")
        }
    );
}

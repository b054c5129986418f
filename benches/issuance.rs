//! CSR-to-certificate issuance, store write and audit line included: what one
//! `POST /v1/certify` costs the CA beyond TLS and HTTP.
//!
//! `cargo bench --bench issuance`

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use time::OffsetDateTime;

use warden_ca::{Authority, CaService, Caller, CertifyRequest, InitOptions};
use warden_config::{SpiffeId, TrustDomain};

fn csr_for(id: &SpiffeId) -> String {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(id.as_str().try_into().unwrap())];
    p.serialize_request(&key).unwrap().pem().unwrap()
}

fn issuance(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let td = TrustDomain::parse("bench.test").unwrap();
    let now = OffsetDateTime::now_utc();
    let authority =
        Authority::init(&tmp.path().join("ca"), &td, &InitOptions::default(), now).unwrap();
    let svc = CaService::open(authority).unwrap();
    let id = SpiffeId::new(&td, "/ns/bench/sa/workload").unwrap();
    let csr = csr_for(&id);

    let mut g = c.benchmark_group("issuance");
    g.measurement_time(Duration::from_secs(10));
    g.bench_function("renewal (csr check, sign, store, audit)", |b| {
        b.iter(|| {
            let req = CertifyRequest {
                csr: csr.clone(),
                token: None,
                ttl: None,
            };
            let caller = Caller::Svid {
                id: id.clone(),
                not_after: OffsetDateTime::now_utc() + Duration::from_secs(3600),
                serial: "00".into(),
            };
            svc.certify(req, caller, OffsetDateTime::now_utc()).unwrap()
        })
    });
    g.bench_function(
        "bootstrap (token lookup and use, csr check, sign, store, audit)",
        |b| {
            b.iter_batched(
                || {
                    svc.create_token(&id, None, OffsetDateTime::now_utc())
                        .unwrap()
                        .0
                },
                |token| {
                    let req = CertifyRequest {
                        csr: csr.clone(),
                        token: Some(token),
                        ttl: None,
                    };
                    svc.certify(req, Caller::Anonymous, OffsetDateTime::now_utc())
                        .unwrap()
                },
                BatchSize::SmallInput,
            )
        },
    );
    // Group commit: 64 callers at once share commits (one pair of fsyncs
    // per batch); the figure is the time per issuance, so 1 s / it is the
    // durable issuances per second.
    g.bench_function("renewal, 64 concurrent callers (group commit)", |b| {
        b.iter_custom(|iters| {
            let per = iters.div_ceil(CALLERS as u64);
            let start = std::time::Instant::now();
            std::thread::scope(|s| {
                for _ in 0..CALLERS {
                    s.spawn(|| {
                        for _ in 0..per {
                            let req = CertifyRequest {
                                csr: csr.clone(),
                                token: None,
                                ttl: None,
                            };
                            let caller = Caller::Svid {
                                id: id.clone(),
                                not_after: OffsetDateTime::now_utc() + Duration::from_secs(3600),
                                serial: "00".into(),
                            };
                            svc.certify(req, caller, OffsetDateTime::now_utc()).unwrap();
                        }
                    });
                }
            });
            start
                .elapsed()
                .mul_f64(iters as f64 / (per * CALLERS as u64) as f64)
        })
    });
    g.finish();
}

/// Concurrent callers in the group-commit case.
const CALLERS: usize = 64;

criterion_group!(benches, issuance);
criterion_main!(benches);

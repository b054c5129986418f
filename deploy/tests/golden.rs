//! Golden files: for each `tests/golden/<case>.in.yaml`, `warden inject`'s
//! mutation must give exactly `<case>.out.yaml`, and injecting that again
//! must change nothing. `WARDEN_BLESS=1 cargo test -p warden-deploy --test
//! golden` rewrites the expected files after a deliberate change (review
//! the diff).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::Path;

use warden_deploy::inject::inject_stream;
use warden_deploy::sidecar::Settings;

fn settings() -> Settings {
    Settings {
        image: "registry.example/warden:0.1.0".into(),
        ca_url: "https://warden-ca.warden.svc:8443".into(),
        bundle_pem: "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n".into(),
        trust_domain: "example.org".into(),
    }
}

#[test]
fn every_case_gives_its_golden_output_and_is_idempotent() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let bless = std::env::var("WARDEN_BLESS").is_ok();
    let mut cases = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(case) = name.strip_suffix(".in.yaml") else {
            continue;
        };
        cases += 1;
        let input = std::fs::read_to_string(&path).unwrap();
        let (out, _) = inject_stream(&input, &settings(), false).unwrap();
        let golden = dir.join(format!("{case}.out.yaml"));
        if bless {
            std::fs::write(&golden, &out).unwrap();
        }
        let want = std::fs::read_to_string(&golden)
            .unwrap_or_else(|e| panic!("{}: {e} (WARDEN_BLESS=1 writes it)", golden.display()));
        assert_eq!(
            out,
            want,
            "{case}: the output differs from {}",
            golden.display()
        );
        let (again, _) = inject_stream(&out, &settings(), false).unwrap();
        assert_eq!(again, out, "{case}: injecting twice changed something");
    }
    assert!(cases >= 8, "{cases} cases");
}

//! Fuzz target: the daemon's config file and resource YAML (`jaunt create -f`). Neither may
//! panic; resources that parse print back to YAML that
//! parses to the same resources.
#![no_main]

use jaunt_config::{file, resource};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = file::parse("jaunt.yaml", text) {
        std::hint::black_box(e.to_string());
    }
    match resource::parse_resources("fuzz.yaml", text) {
        Ok(resources) => {
            if let Ok(yaml) = resource::to_yaml(&resources) {
                let again = resource::parse_resources("again.yaml", &yaml);
                assert!(
                    matches!(&again, Ok(r) if *r == resources),
                    "round trip changed {resources:?}\ninto {again:?}\nvia\n{yaml}"
                );
            }
        }
        Err(e) => {
            std::hint::black_box(e.to_string());
        }
    }
});

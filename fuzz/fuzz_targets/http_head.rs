//! Fuzz target: the app proxy's HTTP/1.1 head parsing, planning and rewriting.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    jaunt_agent::fuzzing::http_head(data);
});

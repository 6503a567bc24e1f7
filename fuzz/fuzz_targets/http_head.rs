//! Fuzz target: HTTP/1.1 heads. The tokenizer and head writer the three HTTP servers share
//! (`jaunt_config::http`, with fuzzed bounds), the engine web route's reading of a request head
//! on top of it, and the app proxy's head parsing, planning and rewriting.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    jaunt_config::http::fuzz_parse(data);
    jaunt_engine::server::fuzz_http_head(data);
    jaunt_agent::fuzzing::http_head(data);
});

//! Fuzz target: the TLS ClientHello parser and the ALPN/SNI route decision.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    jaunt_engine::hello::fuzz_parse(data);
});

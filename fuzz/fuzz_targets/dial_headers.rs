//! Fuzz target: the dial request, stream header, dial response and tunnel hello, with re-encode round trips.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    jaunt_config::wire::dial::fuzz_parse(data);
});

//! Fuzz target: the SSH packet parser of the agent's SSH core (vendor/sunset) in each parse
//! context a connection uses, plus public key and signature blobs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    sunset::fuzz_parse(data);
});

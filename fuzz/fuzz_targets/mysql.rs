//! Fuzz target: the MySQL wire parsers (handshake, commands, results), with fuzzed splits.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    jaunt_agent::fuzzing::mysql(data);
});

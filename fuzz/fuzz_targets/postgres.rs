//! Fuzz target: the PostgreSQL first message and the query scanner.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    jaunt_agent::fuzzing::postgres(data);
});

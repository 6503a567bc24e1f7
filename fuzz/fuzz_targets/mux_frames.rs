//! Fuzz target: a hostile peer's byte stream fed to the tunnel multiplexer's sans-IO core, in either role.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    jaunt_engine::mux::fuzz_input(data);
});

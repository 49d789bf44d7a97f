//! Fuzz target: `malla_core::authz::check_invariants`: any text as an authorization
//! policy document (read, validated, compiled, asked to decide).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    malla_core::authz::check_invariants(data);
});

//! Fuzz target: `malla_proxy::authz::invariants::check_path_invariants`: any bytes as a
//! request target, read as the path an authorization policy matches.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    malla_proxy::authz::invariants::check_path_invariants(data);
});

//! Fuzz target: `malla_proxy::http1::invariants::check_request` (see that module for the invariants).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    malla_proxy::http1::invariants::check_request(data);
});

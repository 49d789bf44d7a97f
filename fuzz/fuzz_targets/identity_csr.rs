//! Fuzz target: `malla_control::identity::invariants::check` (see that module for the
//! invariants): bytes as a CSR, for a first certificate and a renewal, and as the current
//! certificate of a renewal.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    malla_control::identity::invariants::check(data);
});

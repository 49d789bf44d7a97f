//! What must hold of the path a policy matches, whatever a caller sends: the checks behind
//! the cargo-fuzz target `authz_path` (fuzz/) and an always-on bounded test of mutated
//! request targets.
//!
//! A deny rule on `/admin/*` is only as good as the reading of the path: if some target
//! normalised to something an application reads differently (a `..` left in, a doubled
//! slash, an escape of a character that applications decode), the rule could be walked
//! around. So the normalised path must be the application's reading in canonical form:
//! rooted, no empty, `.` or `..` segment, no escape of an unreserved character or `/`,
//! escapes in uppercase hex, no query or fragment, and a fixed point (normalising it again
//! changes nothing).

use super::normalize_path;

/// Panics, saying which, when an invariant does not hold for `target`.
pub fn check_path_invariants(target: &[u8]) {
    let path = normalize_path(target);
    if path == "*" {
        return;
    }
    assert!(path.starts_with('/'), "{target:?} -> {path:?}: not rooted");
    assert!(
        !path.contains('?') && !path.contains('#'),
        "{target:?} -> {path:?}: a query or fragment left"
    );
    let segments: Vec<&str> = path[1..].split('/').collect();
    for (i, segment) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        assert!(
            !segment.is_empty() || last,
            "{target:?} -> {path:?}: an empty segment"
        );
        assert!(
            *segment != "." && *segment != "..",
            "{target:?} -> {path:?}: a dot segment"
        );
    }
    let bytes = path.as_bytes();
    for (i, _) in path.match_indices('%') {
        let (Some(&hi), Some(&lo)) = (bytes.get(i + 1), bytes.get(i + 2)) else {
            continue; // a lone `%`, kept as sent
        };
        let (Some(h), Some(l)) = ((hi as char).to_digit(16), (lo as char).to_digit(16)) else {
            continue;
        };
        let byte = (h << 4 | l) as u8;
        assert!(
            !(byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte)),
            "{target:?} -> {path:?}: an escape applications decode is left at {i}"
        );
        assert!(
            !hi.is_ascii_lowercase() && !lo.is_ascii_lowercase(),
            "{target:?} -> {path:?}: lowercase hex at {i}"
        );
    }
    let again = normalize_path(path.as_bytes());
    assert_eq!(
        again, path,
        "{target:?}: normalising twice changes the path"
    );
}

/// Targets the mutations start from: the tricks the normalisation exists for.
pub const SEEDS: &[&[u8]] = &[
    b"/",
    b"/admin/users",
    b"/v1/../admin/x",
    b"//admin//x",
    b"/%61dmin/x",
    b"/admin%2Fx",
    b"/%2e%2e/%2E./admin",
    b"/a/./b/../../c/",
    b"/public/..%2f..%2fadmin?x=1#f",
    b"http://host:80/a/../b?q",
    b"*",
    b"/caf%C3%A9/%zz/%",
    b"/%252e%252e/admin",
];

#[cfg(test)]
mod tests {
    use malla_core::rng::Rng;

    use super::*;

    /// Pieces a mutation inserts: what path tricks are made of.
    const PIECES: &[&[u8]] = &[
        b"/",
        b".",
        b"..",
        b"%2e",
        b"%2E",
        b"%2f",
        b"%2F",
        b"%25",
        b"%",
        b"?",
        b"#",
        b"a",
        b"%41",
        b"%7e",
        b"%20",
        b"\xc3\xa9",
        b"\xff",
        b"//",
        b"/../",
        b"/./",
        b"://",
    ];

    fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
        let mut out = seed.to_vec();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(out.len() + 1);
            match rng.below(3) {
                0 => {
                    let piece = PIECES[rng.below(PIECES.len())];
                    out.splice(at..at, piece.iter().copied());
                }
                1 if at < out.len() => {
                    out.remove(at);
                }
                _ => out.insert(at, rng.next_u64() as u8),
            }
        }
        out
    }

    #[test]
    fn normalised_paths_hold_their_invariants_over_mutated_targets() {
        let mut rng = Rng::new(0x05ee_da07_5a7b);
        for seed in SEEDS {
            check_path_invariants(seed);
        }
        for _ in 0..50_000 {
            let seed = SEEDS[rng.below(SEEDS.len())];
            check_path_invariants(&mutate(&mut rng, seed));
        }
    }
}

use super::*;

/// Executions of the bounded run: every one feeds a mutated input to all three checks.
const EXECUTIONS: usize = 50_000;

#[test]
fn seeds_satisfy_every_invariant() {
    for seed in REQUEST_SEEDS
        .iter()
        .chain(RESPONSE_SEEDS)
        .chain(CHUNKED_SEEDS)
    {
        check_request(seed);
        check_response(seed);
        check_chunked(seed);
    }
    for seed in CHUNKED_SEEDS {
        assert!(
            matches!(chunked_end(seed), ChunkedEnd::Done(_)),
            "{}",
            show(seed)
        );
    }
}

#[test]
fn the_reference_decoder_reads_the_grammar() {
    for (input, end) in [
        (&b"5\r\nhello\r\n0\r\n\r\nX"[..], ChunkedEnd::Done(15)),
        (
            b"5;a=\"b c\"\r\nhello\r\n0\r\nT: v\r\n\r\n",
            ChunkedEnd::Done(29),
        ),
        (b"5 ;a\r\nhello\r\n0\r\n\r\n", ChunkedEnd::Done(18)),
        (b"5 \r\nhello\r\n0\r\n\r\n", ChunkedEnd::Done(16)),
        (b"0x5\r\nhello\r\n0\r\n\r\n", ChunkedEnd::Invalid),
        (b"5 junk\r\nhello\r\n0\r\n\r\n", ChunkedEnd::Invalid),
        (b"5\r\nhello\n0\r\n\r\n", ChunkedEnd::Invalid),
        (b"0\r\nno colon\r\n\r\n", ChunkedEnd::Invalid),
        (b"5\r\nhel", ChunkedEnd::NeedMore),
    ] {
        assert_eq!(reference_chunked_end(input), end, "{}", show(input));
    }
}

#[test]
fn model_reads_pipelines_and_stops_where_malla_stops() {
    let (reqs, end) = read_requests(
        b"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET http://o/b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nGET /c HTTP/1.1\r\n",
    );
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].body, b"abc");
    assert_eq!(reqs[1].target, b"/b");
    assert_eq!(reqs[1].host.as_deref(), Some(&b"o"[..]));
    assert_eq!(end, ModelEnd::Closed { unread: 17 });
}

/// The bounded, always-on stand-in for the fuzz targets: a fixed seed, a fixed number
/// of mutated inputs through one check (one test per fuzz target, so that one broken
/// invariant does not hide the others). The fuzz targets run the same checks for longer
/// (`fuzz/README.md`). All the seeds feed every check: a response or a chunked body is
/// also a hostile request, and so on.
fn mutation_run(what: &str, salt: u64, check: fn(&[u8])) {
    let mut rng = Rng::new(0x6d61_6c6c_6121 ^ salt);
    let seeds: Vec<&[u8]> = REQUEST_SEEDS
        .iter()
        .chain(RESPONSE_SEEDS)
        .chain(CHUNKED_SEEDS)
        .copied()
        .collect();
    let started = tokio::time::Instant::now();
    for i in 0..EXECUTIONS {
        let mut input = mutate(&mut rng, seeds[i % seeds.len()]);
        if rng.below(4) == 0 {
            input = mutate(&mut rng, &input);
        }
        check(&input);
    }
    eprintln!(
        "http1 invariants, {what}: {EXECUTIONS} mutated inputs in {:?}",
        started.elapsed()
    );
}

#[test]
fn mutated_request_heads_satisfy_the_invariants() {
    mutation_run("request heads", 1, check_request);
}

#[test]
fn mutated_response_heads_satisfy_the_invariants() {
    mutation_run("response heads", 2, check_response);
}

#[test]
fn mutated_chunked_bodies_satisfy_the_invariants() {
    mutation_run("chunked bodies", 3, check_chunked);
}

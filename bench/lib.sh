# bench/lib.sh — shell helpers shared by bench/run and bench/resilience/run (sourced, not run).
#
# The sourcing script sets, before calling these:
#   BENCH_NAME   its name in messages ("bench/run")
#   ROOT         the repository root
#   INSTALL      1: apt_install may install; 0: it dies with what is missing
#   HARNESS_PID  pid of the running Python harness ("" when none), for bench_cleanup
#   PIDFILE      file where the harness lists what it started, for bench_cleanup

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf '\033[31m%s: error: %s\033[0m\n' "${BENCH_NAME:-bench}" "$*" >&2; exit 1; }

# ---------------------------------------------------------------- cleanup (trap EXIT)
# Stops the harness (TERM, then KILL after 5 s), then, as a last resort, whatever it started
# and could not stop (each in its own process group, listed in $PIDFILE).
bench_cleanup() {
  local rc=$?
  if [ -n "${HARNESS_PID:-}" ] && kill -0 "$HARNESS_PID" 2>/dev/null; then
    kill -TERM "$HARNESS_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$HARNESS_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$HARNESS_PID" 2>/dev/null || true
  fi
  if [ -n "${PIDFILE:-}" ] && [ -f "$PIDFILE" ]; then
    while read -r pid; do
      [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && { echo "${BENCH_NAME:-bench}: stopping leftover pid $pid" >&2; kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; }
    done < "$PIDFILE"
    rm -f "$PIDFILE"
  fi
  exit $rc
}
bench_traps() {
  trap bench_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

# ---------------------------------------------------------------- install (idempotent)
APT_UPDATED=0
apt_install() {  # apt_install PACKAGE...
  [ "$INSTALL" = 1 ] || die "missing: $* (run without --no-install, or: apt-get install $*)"
  command -v apt-get >/dev/null || die "apt-get not found; install $* by hand"
  if [ "$APT_UPDATED" = 0 ]; then
    say "apt-get update"
    apt-get update -qq || die "apt-get update failed; check the network/apt sources, then re-run ${BENCH_NAME:-bench}"
    APT_UPDATED=1
  fi
  say "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null \
    || die "apt-get install $* failed; try it by hand: apt-get install $*"
}

# require_tools COMMAND:PACKAGE... — one apt_install of the packages whose command is missing.
require_tools() {
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
  done
  [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
}

# oha_path — prints the oha binary (PATH or ~/.cargo/bin), or nothing.
oha_path() {
  local bin
  bin="$(command -v oha || true)"
  [ -n "$bin" ] || { [ -x "$HOME/.cargo/bin/oha" ] && bin="$HOME/.cargo/bin/oha"; } || true
  printf '%s' "$bin"
}

# ---------------------------------------------------------------- malla
# build_malla LOG [HINT] — `cargo build --release -p malla` (incremental) with its output in
# LOG; on failure prints the log's tail and dies, adding HINT to the message.
build_malla() {
  local log="$1" hint="${2:-}"
  say "cargo build --release -p malla (incremental)"
  if ! (cd "$ROOT" && cargo build --release -p malla --quiet) > "$log" 2>&1; then
    tail -n 30 "$log" >&2
    die "cargo build --release -p malla failed (full log: ${log#"$ROOT"/})${hint:+; $hint}"
  fi
}

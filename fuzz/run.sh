#!/usr/bin/env bash
# Runs the coverage-guided fuzzer on every target (or the ones named), SECONDS each:
#   fuzz/run.sh [SECONDS] [TARGET...]
# Needs cargo-fuzz (`cargo install cargo-fuzz`). New inputs go into fuzz/corpus/<target>;
# minimise before committing (see fuzz/README.md). Findings land in fuzz/artifacts/<target>.
set -euo pipefail
cd "$(dirname "$0")"

seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(request_json request_msgpack task_msgpack template)
fi

# cargo-fuzz passes -Z flags to rustc; the stable toolchain accepts them with this.
export RUSTC_BOOTSTRAP=1
# The services decode on tokio threads with 2 MiB stacks; fuzz with no more than that, so
# deep nesting that would overflow them overflows here too.
ulimit -s 2048

for target in "${targets[@]}"; do
    case "$target" in
        request_json) dict=request_json ;;
        template) dict=template ;;
        *) dict=msgpack ;;
    esac
    mkdir -p "corpus/$target"
    # -s none: the targets are safe Rust, so AddressSanitizer adds little but cost;
    # -a: debug assertions and overflow checks, as in the tests.
    cargo fuzz run -s none -a "$target" "corpus/$target" -- \
        -max_total_time="$seconds" -dict="dict/$dict.dict" -print_final_stats=1
done

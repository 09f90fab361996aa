#!/usr/bin/env bash
# The whole test suite: fetches the default model (idempotent), then runs every test.
# Tests that need the model fail, never skip, when it is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./models/fetch-default.sh
cargo test --all-targets "$@"

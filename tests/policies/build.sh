#!/usr/bin/env bash
# Builds the test-only components (tests/policies/*) for wasm32-wasip2 into tests/policies/dist/:
# hostile.wasm (a misbehaving allocation policy) and wrong-world.wasm (a WASI command).
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p dist
(cd hostile && cargo build --quiet --target wasm32-wasip2 --release)
cp hostile/target/wasm32-wasip2/release/hostile_policy.wasm dist/hostile.wasm
(cd wrong-world && cargo build --quiet --target wasm32-wasip2 --release)
cp wrong-world/target/wasm32-wasip2/release/wrong-world.wasm dist/wrong-world.wasm
ls -l dist

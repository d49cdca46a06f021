#!/usr/bin/env bash
# Builds every example policy as a WebAssembly component and copies it to dist/<name>.wasm.
#
#   bash policies/build.sh          # from anywhere
#
# Each crate of this workspace is a cdylib built for wasm32-wasip2, which links it into a
# component; the file to upload is target/wasm32-wasip2/release/<crate_name>.wasm (dashes
# become underscores there), copied to dist/ under the crate's own name.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
export CARGO_TARGET_DIR="$PWD/target"

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
  echo "build.sh: the wasm32-wasip2 target is missing: rustup target add wasm32-wasip2" >&2
  exit 1
fi

cargo build --target wasm32-wasip2 --release --workspace "$@"

mkdir -p dist
for manifest in */Cargo.toml; do
  name=$(sed -n 's/^name = "\(.*\)"$/\1/p' "$manifest" | head -n 1)
  artifact="target/wasm32-wasip2/release/${name//-/_}.wasm"
  if [[ ! -f "$artifact" ]]; then
    echo "build.sh: $artifact was not built" >&2
    exit 1
  fi
  cp "$artifact" "dist/$name.wasm"
  printf '%-36s %8d bytes\n' "dist/$name.wasm" "$(wc -c < "dist/$name.wasm")"
done

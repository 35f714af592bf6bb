#!/usr/bin/env bash
# buf breaking against the previous commit, once it has contracts (FILE rules, see buf.yaml).
set -euo pipefail
buf=${BUF:-buf}
if ! git rev-parse --verify -q HEAD~1 >/dev/null; then
  echo "buf breaking: no previous commit to compare with"
  exit 0
fi
if ! git cat-file -e HEAD~1:buf.yaml 2>/dev/null; then
  echo "buf breaking: the previous commit has no contracts yet"
  exit 0
fi
"$buf" breaking --against '.git#ref=HEAD~1'
echo "buf breaking: no breaking change against HEAD~1"

#!/usr/bin/env bash
# Generates Python messages, type stubs and gRPC stubs for proto/ into the folder given (gen/ by
# default). `make gen` writes gen/; `make gen-check` writes a temporary folder and diffs it.
set -euo pipefail
out=${1:-gen}
py=${PYTHON:-.venv/bin/python}
rm -rf "$out/llorch"
mkdir -p "$out"
mapfile -t protos < <(cd proto && find llorch -name '*.proto' | sort)
(cd proto && "$OLDPWD/$py" -m grpc_tools.protoc -I . -I ../third_party \
  --python_out="$OLDPWD/$out" --pyi_out="$OLDPWD/$out" --grpc_python_out="$OLDPWD/$out" \
  "${protos[@]}")
# Regular packages, so setuptools and mypy see gen/llorch as an ordinary import root.
find "$out/llorch" -type d -exec sh -c 'for d; do : > "$d/__init__.py"; done' sh {} +

#!/usr/bin/env bash
# Installs the system tools llama-cpp-python compiles with (a C++ compiler and cmake >= 3.21),
# and curl and jq, when they are missing, through apt-get on Debian-like machines.
set -euo pipefail
missing=()
command -v g++ >/dev/null || missing+=(g++)
command -v cmake >/dev/null || missing+=(cmake)
command -v make >/dev/null || missing+=(make)
command -v curl >/dev/null || missing+=(curl)  # tools/ensure-go.sh; the REST recipes
command -v jq >/dev/null || missing+=(jq)  # the REST recipes in docs/operators.md
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "missing build tools: ${missing[*]}; install them with your package manager" >&2
  exit 1
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing build tools: ${missing[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null

#!/usr/bin/env bash
# Prints the path of a Go command that can build gateway/ (Go >= 1.21: it fetches the exact
# toolchain gateway/go.mod names by itself). When the machine has none, or one too old, it
# downloads Go from the Go module proxy (the golang.org/toolchain module, the same files
# `GOTOOLCHAIN` fetches) into .venv/go, once.
set -euo pipefail
cd "$(dirname "$0")/.."
version=1.26.8
local_go=.venv/go/bin/go
usable() {
  local v
  v=$("$1" env GOVERSION 2>/dev/null) || return 1
  v=${v#go}
  local major=${v%%.*} rest=${v#*.}
  local minor=${rest%%.*}
  [ "$major" -gt 1 ] || { [ "$major" -eq 1 ] && [ "$minor" -ge 21 ]; }
}
if command -v go >/dev/null && usable "$(command -v go)"; then
  command -v go
  exit 0
fi
if [ -x "$local_go" ] && usable "$local_go"; then
  echo "$PWD/$local_go"
  exit 0
fi
# The go.sum hashes of the toolchain module (what the Go checksum database records for it).
case "$(uname -m)" in
  x86_64) arch=amd64 sum=h1:ZOmGe1OnfREDMIdb1Qi4G9JSuDPBLGExZMQ4nis1RXM= ;;
  aarch64 | arm64) arch=arm64 sum=h1:sYL/O6MqS68ML0kjsQ36WoYIpJqkw60TxizWUYUKQMc= ;;
  *) echo "no Go for $(uname -m); install Go >= 1.21" >&2; exit 1 ;;
esac
proxy=${GOPROXY:-https://proxy.golang.org}
proxy=${proxy%%,*}
[ "$proxy" = direct ] || [ "$proxy" = off ] && proxy=https://proxy.golang.org
url="$proxy/golang.org/toolchain/@v/v0.0.1-go$version.linux-$arch.zip"
echo "downloading Go $version from $url" >&2
mkdir -p .venv
zip=$(mktemp .venv/go-XXXXXX.zip)
trap 'rm -f "$zip"' EXIT
curl -fsSL --retry 3 -o "$zip" "$url"
rm -rf .venv/go
python3 - "$zip" "toolchain@v0.0.1-go$version.linux-$arch/" "$sum" <<'PY'
import base64, hashlib, os, sys, zipfile
root = sys.argv[2]  # every file sits under golang.org/<root>
with zipfile.ZipFile(sys.argv[1]) as z:
    # Go's "h1" module hash: SHA-256 over the lines "<sha256 of file>  <name>", by name.
    names = sorted(i.filename for i in z.infolist() if not i.filename.endswith("/"))
    lines = [f"{hashlib.sha256(z.read(n)).hexdigest()}  {n}\n" for n in names]
    got = "h1:" + base64.b64encode(hashlib.sha256("".join(lines).encode()).digest()).decode()
    if got != sys.argv[3]:
        sys.exit(f"the downloaded Go is not the one pinned: {got} != {sys.argv[3]}")
    for info in z.infolist():
        name = info.filename.partition(root)[2]
        if not name or name.endswith("/"):
            continue
        target = os.path.join(".venv/go", name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with z.open(info) as src, open(target, "wb") as dst:
            dst.write(src.read())
        mode = (info.external_attr >> 16) & 0o777
        os.chmod(target, mode or 0o644)
PY
usable "$local_go" || { echo "the Go downloaded from $url does not run" >&2; exit 1; }
echo "$PWD/$local_go"

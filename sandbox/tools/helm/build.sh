#!/usr/bin/env bash
# Build the helm CLI from its Go module (pinned in go.mod/go.sum beside this script).
#
#   sandbox/tools/helm/build.sh OUTDIR
#
# The tests use it for `helm lint` and `helm template` of charts/sql-workload-identity-operator;
# sandbox.tools.helm_binary() calls this once and caches the binary keyed by go.sum.
set -euo pipefail

if [ $# -ne 1 ] || [ -z "$1" ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
if ! command -v go >/dev/null 2>&1; then
  echo "error: Go toolchain not found: install Go 1.26+ and put 'go' on PATH" >&2
  exit 1
fi
export GOTOOLCHAIN=local
export GOFLAGS=-mod=readonly
export CGO_ENABLED=${CGO_ENABLED:-0}

mkdir -p "$1"
out=$(cd "$1" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")"
version=$(go list -m -f '{{.Version}}' helm.sh/helm/v4)
echo "building helm $version into $out (first build: a few minutes on 2 cores)" >&2
go build -trimpath -ldflags="-s -w -X helm.sh/helm/v4/internal/version.version=$version" \
  -o "$out/helm" helm.sh/helm/v4/cmd/helm
echo "built $out/helm" >&2

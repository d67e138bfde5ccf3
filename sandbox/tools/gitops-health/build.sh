#!/usr/bin/env bash
# Build gitops-health (main.go beside this script; kstatus and gopher-lua pinned in go.mod/go.sum).
#
#   sandbox/tools/gitops-health/build.sh OUTDIR
#
# The tests use it to read our resources' status the way Flux (kstatus) and Argo CD (its Lua
# health check from deploy/argocd/) do; sandbox.tools.gitops_health_binary() calls this once and
# caches the binary keyed by the sources.
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
# Fetch the pinned modules first (read from go.mod, no network), so that a refusal by the module
# proxy is one line naming the module and version rather than a build log.
modules=$(awk '/^require \(/{b=1; next} b && /^\)/{b=0} b {print $1 "@" $2} /^require [^(]/{print $2 "@" $3}' go.mod)
if ! go mod download $modules >/dev/null 2>&1; then
  for module in $modules; do
    if ! err=$(go mod download "$module" 2>&1); then
      echo "error: the Go module proxy ($(go env GOPROXY)) refused ${module%@*} ${module#*@}: $(tail -n1 <<<"$err")" >&2
      exit 1
    fi
  done
fi
echo "building gitops-health (kstatus from sigs.k8s.io/cli-utils $(go list -m -f '{{.Version}}' sigs.k8s.io/cli-utils)) into $out" >&2
go build -trimpath -ldflags="-s -w" -o "$out/gitops-health" .
echo "built $out/gitops-health" >&2

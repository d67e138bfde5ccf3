#!/usr/bin/env bash
# Build swi-controlplane (embedded etcd + kube-apiserver + kube-controller-manager
# + kube-scheduler), and kubectl, kubelet and kube-proxy (the sandbox node's)
# from the same pinned k8s.io/kubernetes module set.
#
#   sandbox/controlplane/build.sh OUTDIR
#
# Uses Go's default module and build caches, so only the first build is slow
# (10-20+ minutes on 2 cores); later builds reuse the cache.
set -euo pipefail

if [ $# -ne 1 ] || [ -z "$1" ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
out=$1

if ! command -v go >/dev/null 2>&1; then
  echo "error: Go toolchain not found: install Go 1.26+ (https://go.dev/dl/) and put 'go' on PATH" >&2
  exit 1
fi

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# The pinned module set needs Go >= 1.26; never let go download another toolchain.
export GOTOOLCHAIN=local
# go.sum is complete and committed: fail instead of silently changing go.mod.
export GOFLAGS="-mod=readonly -buildvcs=false"
export CGO_ENABLED=${CGO_ENABLED:-0}

gover=$(go env GOVERSION)
minor=$(printf '%s' "$gover" | sed -n 's/^go1\.\([0-9][0-9]*\).*/\1/p')
if [ -z "$minor" ] || [ "$minor" -lt 26 ]; then
  echo "error: Go toolchain is $gover: install Go 1.26+ (https://go.dev/dl/)" >&2
  exit 1
fi

mkdir -p "$out"
out=$(cd "$out" && pwd)

cd "$here"

# Stamp the Kubernetes version the way upstream release builds do
# (hack/lib/version.sh); without it /version says v0.0.0-master and kubectl
# cannot parse it. Values come from the pinned module, so builds are reproducible.
kver=$(go list -m -f '{{.Version}}' k8s.io/kubernetes)
kdate=$(go list -m -f '{{if .Time}}{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}{{end}}' k8s.io/kubernetes)
kmajor=$(printf '%s' "$kver" | sed -n 's/^v\([0-9]*\)\.\([0-9]*\)\..*/\1/p')
kminor=$(printf '%s' "$kver" | sed -n 's/^v\([0-9]*\)\.\([0-9]*\)\..*/\2/p')
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags="$ldflags -X $pkg.gitVersion=$kver -X $pkg.gitMajor=$kmajor -X $pkg.gitMinor=$kminor -X $pkg.gitTreeState=clean"
  if [ -n "$kdate" ]; then ldflags="$ldflags -X $pkg.buildDate=$kdate"; fi
done

echo "building swi-controlplane, kubectl, kubelet and kube-proxy into $out with $gover (first build takes 10-20+ min on 2 cores)" >&2
go build -trimpath -ldflags="$ldflags" -o "$out/kubelet" k8s.io/kubernetes/cmd/kubelet
go build -trimpath -ldflags="$ldflags" -o "$out/kube-proxy" k8s.io/kubernetes/cmd/kube-proxy
go build -trimpath -ldflags="$ldflags" -o "$out/swi-controlplane" .
go build -trimpath -ldflags="$ldflags" -o "$out/kubectl" k8s.io/kubernetes/cmd/kubectl
echo "built $out/swi-controlplane $out/kubectl $out/kubelet $out/kube-proxy" >&2

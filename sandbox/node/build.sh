#!/usr/bin/env bash
# Build the sandbox node's runtime from the Go modules pinned in go.mod/go.sum beside this script:
# containerd, containerd-shim-runc-v2 and ctr (github.com/containerd/containerd/v2), runc
# (github.com/opencontainers/runc, with seccomp through Debian's libseccomp-dev), and two tiny
# static programs of our own: pause (the pod sandbox image) and swi-probe (the test workload).
# kubelet and kube-proxy come from the control plane's module (sandbox/controlplane/build.sh).
#
#   sandbox/node/build.sh OUTDIR
set -euo pipefail

if [ $# -ne 1 ] || [ -z "$1" ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
if ! command -v go >/dev/null 2>&1; then
  echo "error: Go toolchain not found: install Go 1.26+ (https://go.dev/dl/) and put 'go' on PATH" >&2
  exit 1
fi
if ! pkg-config --exists libseccomp 2>/dev/null; then
  echo "error: libseccomp-dev is missing (runc is built with seccomp): run 'make system-deps' as root, or 'sudo apt-get install libseccomp-dev pkg-config'" >&2
  exit 1
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

export GOTOOLCHAIN=local
export GOFLAGS="-mod=readonly -buildvcs=false"
mkdir -p "$1"
out=$(cd "$1" && pwd)
cd "$here"

ctrd=github.com/containerd/containerd/v2
ctrd_ver=$(go list -m -f '{{.Version}}' $ctrd)
runc_ver=$(go list -m -f '{{.Version}}' github.com/opencontainers/runc)
echo "building containerd $ctrd_ver, runc $runc_ver, pause and swi-probe into $out" >&2

# containerd without the snapshotters that need C libraries or kernel features we do not use
# (overlayfs and native stay).
tags="no_btrfs no_devmapper no_zfs no_aufs"
ldflags="-s -w -X $ctrd/version.Version=$ctrd_ver -X $ctrd/version.Package=$ctrd"
CGO_ENABLED=0 go build -trimpath -tags "$tags" -ldflags "$ldflags" -o "$out/containerd" $ctrd/cmd/containerd
CGO_ENABLED=0 go build -trimpath -tags "$tags" -ldflags "$ldflags" -o "$out/containerd-shim-runc-v2" $ctrd/cmd/containerd-shim-runc-v2
CGO_ENABLED=0 go build -trimpath -tags "$tags" -ldflags "$ldflags" -o "$out/ctr" $ctrd/cmd/ctr
# Debian's runc 1.1.5 fails on the CRI's spec ("can't get final child's PID from pipe"): build
# the pinned one, with seccomp (cgo + libseccomp).
CGO_ENABLED=1 go build -trimpath -tags "seccomp" \
  -ldflags "-s -w -X main.version=${runc_ver#v}" -o "$out/runc" github.com/opencontainers/runc
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out/pause" ./cmd/pause
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out/swi-probe" ./cmd/swi-probe
echo "built $out/{containerd,containerd-shim-runc-v2,ctr,runc,pause,swi-probe}" >&2

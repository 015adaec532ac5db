#!/usr/bin/env bash
# Builds the local Kubernetes control plane used by `make cluster-up` and the
# cluster tests: kube-apiserver, kube-controller-manager, kube-scheduler and
# kubectl from the pinned k8s.io/kubernetes Go module, etcd from its Go modules
# and KWOK with `go install`. Release binaries cannot be downloaded here, the Go
# module proxy can be reached. Binaries are cached outside the repo, keyed by
# version, so a warm run returns at once.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.35.4}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.6}"
KWOK_VERSION="${KWOK_VERSION:-v0.7.0}"
CACHE="${LMFORGE_CACHE:-$HOME/.cache/lmforge}"
BIN="$CACHE/bin/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION"
export GOFLAGS="-mod=mod"
export CGO_ENABLED=0

if [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/etcd" ] && [ -x "$BIN/kwok" ] && [ -x "$BIN/kubectl" ] \
   && [ -x "$BIN/kube-controller-manager" ] && [ -x "$BIN/kube-scheduler" ]; then
  echo "$BIN"
  exit 0
fi
command -v go >/dev/null || { echo "error: Go is needed to build the control plane" >&2; exit 1; }
mkdir -p "$BIN"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# --- Kubernetes: a wrapper module pinning every staging module to v0.<minor>.<patch>
staging="v0.${K8S_VERSION#v1.}"
mkdir -p "$work/k8s" && cd "$work/k8s"
cat > go.mod <<MOD
module lmforge.local/controlplane

go 1.25.0

require k8s.io/kubernetes $K8S_VERSION
MOD
gomod="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^\s*"GoMod": "\(.*\)",$/\1/p')"
sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$gomod" > staging.txt
test -s staging.txt || { echo "error: no staging modules found in $gomod" >&2; exit 1; }
{ echo "replace ("; while read -r m; do echo "  $m => $m $staging"; done < staging.txt; echo ")"; } >> go.mod
cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
go mod tidy >/dev/null 2>&1 || go mod tidy
minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags="$ldflags -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
done
for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  echo "building $cmd $K8S_VERSION" >&2
  go build -trimpath -ldflags "$ldflags" -o "$BIN/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd"
  mv "$BIN/$cmd.tmp" "$BIN/$cmd"
done

# --- etcd: its server module has replace directives, so it is built through a wrapper too
mkdir -p "$work/etcd" && cd "$work/etcd"
printf 'module lmforge.local/etcd\n\ngo 1.24\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION" > go.mod
printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' > tools.go
go mod tidy >/dev/null 2>&1 || go mod tidy
echo "building etcd $ETCD_VERSION" >&2
go build -trimpath -ldflags "-s -w" -o "$BIN/etcd.tmp" go.etcd.io/etcd/server/v3
mv "$BIN/etcd.tmp" "$BIN/etcd"

# --- KWOK
echo "building kwok $KWOK_VERSION" >&2
GOBIN="$work/kwokbin" go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
mv "$work/kwokbin/kwok" "$BIN/kwok"
echo "$BIN"

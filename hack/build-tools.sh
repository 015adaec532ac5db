#!/usr/bin/env bash
# Builds or installs the tools the chart, alert-rule and Argo CD health tests use,
# cached outside the repo keyed by version (as hack/build-control-plane.sh does):
#   helm        from its Go module, with the version ldflags of Helm's Makefile (a plain
#               `go install` would tell templates .Capabilities.KubeVersion is v1.20)
#   luahealth   hack/luahealth: a tiny Go program that runs Argo CD health.lua scripts
#               under gopher-lua, the Lua engine Argo CD itself embeds
#   prometheus, promtool   Debian's `prometheus` package (apt-get, when missing and root)
#   @grafana/schema + typescript   from npm, for type-checking the Grafana dashboard
#   prometheus-operator CRDs   ServiceMonitor, PodMonitor, PrometheusRule from its Go module,
#               so a real API server validates the chart's monitoring objects
# Prints the directory holding helm, luahealth and grafana-schema/node_modules. A warm run returns at once.
set -euo pipefail

HELM_VERSION="${HELM_VERSION:-v3.22.0}"
GRAFANA_SCHEMA_VERSION="${GRAFANA_SCHEMA_VERSION:-12.4.11}"
TYPESCRIPT_VERSION="${TYPESCRIPT_VERSION:-5.9.3}"
PROMETHEUS_OPERATOR_VERSION="${PROMETHEUS_OPERATOR_VERSION:-v0.85.0}"
# gopher-lua: pinned in hack/luahealth/go.mod (v1.1.1, the version Argo CD builds with).
CACHE="${LMFORGE_CACHE:-$HOME/.cache/lmforge}"
BIN="$CACHE/bin/tools-helm-$HELM_VERSION"
HERE="$(cd "$(dirname "$0")" && pwd)"
export GOFLAGS="-mod=mod"
export CGO_ENABLED=0

if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing prometheus (Debian package)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
    # The package starts a system service on :9090; the tests run their own on 127.0.0.1.
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
      systemctl disable --now prometheus prometheus-node-exporter >/dev/null 2>&1 || true
    fi
  else
    echo "warning: prometheus/promtool missing; install Debian's 'prometheus' package" >&2
  fi
fi

# @grafana/schema and tsc, to type-check the Grafana dashboard (npm registry).
NPM_DIR="$BIN/grafana-schema-$GRAFANA_SCHEMA_VERSION-typescript-$TYPESCRIPT_VERSION"
if [ ! -x "$NPM_DIR/node_modules/typescript/bin/tsc" ] || [ ! -d "$NPM_DIR/node_modules/@grafana/schema" ]; then
  if command -v npm >/dev/null; then
    echo "installing @grafana/schema $GRAFANA_SCHEMA_VERSION and typescript $TYPESCRIPT_VERSION" >&2
    rm -rf "$NPM_DIR.tmp" && mkdir -p "$NPM_DIR.tmp" && echo '{"private": true}' > "$NPM_DIR.tmp/package.json"
    npm install --prefix "$NPM_DIR.tmp" --no-audit --no-fund --silent \
      "@grafana/schema@$GRAFANA_SCHEMA_VERSION" "typescript@$TYPESCRIPT_VERSION" >&2
    rm -rf "$NPM_DIR" && mv "$NPM_DIR.tmp" "$NPM_DIR"
  else
    echo "warning: npm missing; the dashboard type check needs it" >&2
  fi
fi
[ -d "$NPM_DIR" ] && ln -sfn "$(basename "$NPM_DIR")" "$BIN/grafana-schema"

# The monitoring CRDs, as the cluster's prometheus-operator would install them.
PROM_CRDS="$BIN/prometheus-operator-crds-$PROMETHEUS_OPERATOR_VERSION"
if [ ! -f "$PROM_CRDS/monitoring.coreos.com_prometheusrules.yaml" ] && command -v go >/dev/null; then
  echo "fetching prometheus-operator $PROMETHEUS_OPERATOR_VERSION CRDs (Go module)" >&2
  module_dir="$(cd "${TMPDIR:-/tmp}" && GOFLAGS=-mod=mod go mod download -json \
    "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  mkdir -p "$BIN" && rm -rf "$PROM_CRDS.tmp" && mkdir -p "$PROM_CRDS.tmp"
  for kind in servicemonitors podmonitors prometheusrules; do
    cp "$module_dir/example/prometheus-operator-crd/monitoring.coreos.com_$kind.yaml" "$PROM_CRDS.tmp/"
  done
  rm -rf "$PROM_CRDS" && mv "$PROM_CRDS.tmp" "$PROM_CRDS"
fi
[ -d "$PROM_CRDS" ] && ln -sfn "$(basename "$PROM_CRDS")" "$BIN/prometheus-operator-crds"

# luahealth is keyed by its source too, so an edited harness is rebuilt.
lua_sum="$(cat "$HERE"/luahealth/{main.go,go.mod,go.sum} | sha256sum | cut -c1-12)"
if [ -x "$BIN/helm" ] && [ -x "$BIN/luahealth-$lua_sum" ]; then
  echo "$BIN"
  exit 0
fi
command -v go >/dev/null || { echo "error: Go is needed to build helm and luahealth" >&2; exit 1; }
mkdir -p "$BIN"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if [ ! -x "$BIN/helm" ]; then
  mkdir -p "$work/helm" && cd "$work/helm"
  printf 'module lmforge.local/helm\n\ngo 1.25.0\n\nrequire helm.sh/helm/v3 %s\n' "$HELM_VERSION" > go.mod
  printf '//go:build tools\n\npackage tools\n\nimport _ "helm.sh/helm/v3/cmd/helm"\n' > tools.go
  go mod tidy >/dev/null 2>&1 || go mod tidy
  # Helm's Makefile: Kubernetes major.minor from the client-go it was built with (v0.X -> 1.X).
  kver="$(go list -f '{{.Version}}' -m k8s.io/client-go)"; kver="${kver#v0.}"; kminor="${kver%%.*}"
  ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    ldflags="$ldflags -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$kminor"
  done
  echo "building helm $HELM_VERSION" >&2
  go build -trimpath -ldflags "$ldflags" -o "$BIN/helm.tmp" helm.sh/helm/v3/cmd/helm
  mv "$BIN/helm.tmp" "$BIN/helm"
fi

echo "building luahealth" >&2
cp "$HERE"/luahealth/{main.go,go.mod,go.sum} "$work/"
cd "$work"
go build -trimpath -ldflags "-s -w" -o "$BIN/luahealth.tmp" .
rm -f "$BIN"/luahealth-*
mv "$BIN/luahealth.tmp" "$BIN/luahealth-$lua_sum"
ln -sf "luahealth-$lua_sum" "$BIN/luahealth"
echo "$BIN"

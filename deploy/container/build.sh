#!/usr/bin/env bash
# Build the ltu-daemon container image from this checkout.
#
#   deploy/container/build.sh [--variant cpu|cuda] [--local-base] [--tag NAME] [--base IMAGE]
#
# --variant cuda   torch from the CUDA index on an NVIDIA CUDA runtime base (default tag ltu-daemon:cuda)
# --local-base     build the Debian base from Debian packages with mmdebstrap and import it (no registry needed)
# ENGINE=podman (default) or docker; ENGINE_OPTS go before the engine's subcommand (e.g. "--runtime runc"),
# BUILD_OPTS after `build` (e.g. "--ulimit nofile=1024:1024"). This host's pip settings (indexes, wheel folders)
# apply in the build too, so the image installs what pip here would; TORCH_INDEX= (empty) leaves out PyTorch's
# index where those settings already provide torch.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
ENGINE=${ENGINE:-podman}
read -r -a engine_opts <<< "${ENGINE_OPTS:-}"
read -r -a build_opts <<< "${BUILD_OPTS:-}"
variant=cpu local_base=0 tag="" base=""
while [ $# -gt 0 ]; do
    case $1 in
        --variant) variant=$2; shift 2 ;;
        --local-base) local_base=1; shift ;;
        --tag) tag=$2; shift 2 ;;
        --base) base=$2; shift 2 ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case $variant in
    cpu) index=https://download.pytorch.org/whl/cpu; : "${base:=docker.io/library/debian:bookworm-slim}" ;;
    cuda) index=https://download.pytorch.org/whl/cu124; : "${base:=docker.io/nvidia/cuda:12.4.1-runtime-ubuntu22.04}" ;;
    *) echo "build.sh: --variant is cpu or cuda, not $variant" >&2; exit 2 ;;
esac
tag=${tag:-ltu-daemon:$variant}
py=${PYTHON:-$root/.venv/bin/python}
[ -x "$py" ] || py=python3

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/src" "$ctx/dist"
# the files git tracks (and untracked ones it does not ignore), as a fresh clone has them
git -C "$root" ls-files -co --exclude-standard -z | (cd "$root" && tar --null -T - -cf -) | tar -xf - -C "$ctx/src"
echo "build.sh: building the wheel" >&2
"$py" -m pip wheel -q --no-deps --no-build-isolation -w "$ctx/dist" "$ctx/src"
cp "$root/constraints.txt" "$root/deploy/container/entrypoint.sh" "$ctx/dist/"
cp "$root/deploy/container/Containerfile" "$ctx/Containerfile"
rm -rf "$ctx/src"

if [ "$local_base" = 1 ]; then
    [ "$variant" = cpu ] || { echo "build.sh: --local-base builds a Debian base: CPU only" >&2; exit 2; }
    echo "build.sh: building the Debian base with mmdebstrap" >&2
    mmdebstrap --quiet --variant=apt --include=python3,python3-venv,libportaudio2,ca-certificates,tini \
        bookworm "$ctx/base.tar"
    base=localhost/ltu-daemon-base:bookworm
    "$ENGINE" "${engine_opts[@]}" import --quiet "$ctx/base.tar" "$base" >/dev/null
    rm -f "$ctx/base.tar"
fi

# this host's pip settings (indexes, wheel folders, CA bundle: mirrors, a local torch wheel, a proxy), passed to pip in the build, and
# the local folders they name mounted read only at the same paths
mounts=() pip_args=""
while IFS= read -r line; do
    key=${line%%=*} value=${line#*=}
    key=${key#*.} value=${value#\'} value=${value%\'}
    case $key in
        index-url|extra-index-url|find-links|cert)  # cert: a CA bundle (a proxy that inspects TLS, say)
            for v in $value; do
                pip_args+=" --$key $v"
                path=${v#file://} path=${path%/}
                [ "${path##*/}" = simple ] && path=${path%/simple}  # a local index links to files beside simple/
                [ "${path:0:1}" = / ] && [ -e "$path" ] && mounts+=(--volume "$path:$path:ro")
            done ;;
    esac
done < <("$py" -m pip config list 2>/dev/null)

# podman writes OCI images by default, which have no HEALTHCHECK: ask for the Docker format that keeps it
[ "$(basename "$ENGINE")" = podman ] && build_opts+=(--format docker)
echo "build.sh: building $tag from $base" >&2
"$ENGINE" "${engine_opts[@]}" build "${build_opts[@]}" --network host "${mounts[@]}" \
    --build-arg "BASE=$base" --build-arg "VARIANT=$variant" --build-arg "TORCH_INDEX=${TORCH_INDEX-$index}" \
    --build-arg "PIP_ARGS=$pip_args" \
    --tag "$tag" --file "$ctx/Containerfile" "$ctx"
echo "build.sh: built $tag" >&2

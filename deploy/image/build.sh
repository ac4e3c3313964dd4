#!/bin/bash
# Build the sigclassd serving image (no TensorFlow) with podman. See --help.
set -euo pipefail

usage() {
    cat <<'TEXT'
Usage: deploy/image/build.sh [--tag NAME] [--base IMAGE | --debootstrap-base] [--cache DIR]

Builds the sigclassd serving image from this checkout with podman:
  1. a wheelhouse on the host (pip wheel: sigclassd and its serving dependencies), because
     build steps inside the image get no network and install from it with --no-index;
  2. with --debootstrap-base, a Debian bookworm minbase base image with python3 and
     python3-venv, made with debootstrap and `podman import`, cached under DIR keyed by a
     hash of its recipe (the first build takes a minute or two, later ones reuse it);
  3. `podman build --format docker` of deploy/image/Containerfile on that base.
Prints the image's size at the end.

Options:
  --tag NAME           image name (default localhost/sigclassd:latest)
  --base IMAGE         base image (default docker.io/library/python:3.11-slim-bookworm, pulled)
  --debootstrap-base   build the base locally instead (needs debootstrap and a Debian mirror)
  --cache DIR          where the debootstrapped base is kept (default /var/tmp/sigclassd-image-cache)
  --mirror URL         Debian mirror for debootstrap (default http://deb.debian.org/debian)
Environment: PYTHON (the host Python that builds the wheels: .venv/bin/python if present),
CONTAINERS_CONF (default deploy/image/containers.conf: runc, nproc limit).
TEXT
}

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
tag=localhost/sigclassd:latest
base=docker.io/library/python:3.11-slim-bookworm
debootstrap_base=no
cache=/var/tmp/sigclassd-image-cache
mirror=http://deb.debian.org/debian
while [ $# -gt 0 ]; do
    case "$1" in
        --tag) tag=$2; shift 2 ;;
        --base) base=$2; shift 2 ;;
        --debootstrap-base) debootstrap_base=yes; shift ;;
        --cache) cache=$2; shift 2 ;;
        --mirror) mirror=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "build.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done
export CONTAINERS_CONF=${CONTAINERS_CONF:-$here/containers.conf}
python=${PYTHON:-$root/.venv/bin/python}
[ -x "$python" ] || python=python3
for tool in podman tar; do
    command -v "$tool" >/dev/null || { echo "build.sh: $tool not found (apt-get install $tool)" >&2; exit 1; }
done

started=$SECONDS
step() { echo "build.sh [$((SECONDS - started)) s] $*"; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# 1. Wheelhouse. The sources are copied out first so that the build writes nothing
# (build/, *.egg-info) into the checkout.
step "wheelhouse: pip wheel sigclassd and its serving dependencies"
mkdir -p "$work/src" "$work/context/wheels"
tar -C "$root" --exclude=__pycache__ --exclude='*.egg-info' --exclude=build \
    -cf - pyproject.toml README.md daemon | tar -C "$work/src" -xf -
"$python" -m pip wheel --disable-pip-version-check --wheel-dir "$work/context/wheels" "$work/src" \
    > "$work/wheel.log" 2>&1 || { tail -30 "$work/wheel.log" >&2; exit 1; }
cp "$here/Containerfile" "$here/entrypoint.sh" "$here/sigclassd.toml" "$work/context/"

# 2. Base image.
if [ "$debootstrap_base" = yes ]; then
    command -v debootstrap >/dev/null || { echo "build.sh: debootstrap not found (apt-get install debootstrap)" >&2; exit 1; }
    recipe="debootstrap --variant=minbase --include=python3,python3-venv bookworm $mirror; clean v1"
    key=$(printf '%s' "$recipe" | sha256sum | cut -c1-16)
    base=localhost/sigclassd-base:$key
    tarball=$cache/base-$key.tar
    if [ ! -f "$tarball" ]; then
        step "base: debootstrap bookworm minbase + python3 into $tarball (a minute or two, once)"
        mkdir -p "$cache"
        debootstrap --variant=minbase --include=python3,python3-venv bookworm "$work/rootfs" "$mirror" \
            > "$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
        rm -rf "$work/rootfs"/var/cache/apt/archives/*.deb "$work/rootfs"/var/lib/apt/lists/* \
               "$work/rootfs"/usr/share/doc "$work/rootfs"/usr/share/man
        tar --numeric-owner -C "$work/rootfs" -cf "$tarball.part" .
        mv "$tarball.part" "$tarball"
    fi
    if ! podman image exists "$base"; then
        step "base: podman import $tarball as $base"
        podman import --quiet --change 'CMD ["/bin/bash"]' "$tarball" "$base" >/dev/null
    fi
fi

# 3. The image.
step "image: podman build $tag FROM $base"
podman build --quiet --format docker --build-arg "BASE=$base" --tag "$tag" \
    --file "$work/context/Containerfile" "$work/context" >/dev/null
# The build stage and the image this tag named before are left untagged: remove them.
podman image prune --force --filter label=org.opencontainers.image.title=sigclassd >/dev/null
size=$(podman image inspect --format '{{.Size}}' "$tag")
step "built $tag: $((size / 1000000)) MB"

#!/usr/bin/env bash
# The local stand-in for the Dockerfile's CUDA base image, where no registry
# can be reached: a minimal Debian bookworm (Python 3.11 from its archive),
# made with mmdebstrap and imported into podman. Kept once made.
#
#   docker/debian-base.sh [IMAGE]      # default localhost/imdb-dist-base:bookworm
#   podman --runtime runc build --format docker --build-arg CUDA_IMAGE=localhost/imdb-dist-base:bookworm ...
#
# Needs root, podman and mmdebstrap (apt-get install podman runc mmdebstrap).
set -euo pipefail

image="${1:-localhost/imdb-dist-base:bookworm}"
if podman image exists "$image"; then
    echo "$image: present"
    exit 0
fi
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
mmdebstrap --quiet --variant=minbase bookworm "$scratch/base.tar"
podman import --quiet --change 'CMD ["/bin/bash"]' "$scratch/base.tar" "$image" > /dev/null
echo "$image: made"

#!/usr/bin/env bash
# Build the afm-ray cluster image from this checkout, tagged the way the cluster configs
# expect: REPOSITORY:<pyproject version>-ray<Ray version>-py311-gpu.
#
#   clusters/build_image.sh REPOSITORY [--push] [extra `docker build` arguments]
#   clusters/build_image.sh 123456789012.dkr.ecr.us-west-2.amazonaws.com/afm-ray --push
#
# Needs Docker with BuildKit (the default builder since Docker 23) and Python >= 3.11.
set -euo pipefail
cd "$(dirname "$0")/.."

repository=${1:?usage: clusters/build_image.sh REPOSITORY [--push] [docker build args]}
shift
push=0
if [[ ${1:-} == --push ]]; then push=1; shift; fi

version=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
base=$(sed -n 's/^ARG BASE_IMAGE=//p' clusters/Dockerfile)   # rayproject/ray:2.60.0-py311-gpu
tag="$repository:$version-ray${base#*:}"                       # ...:0.1.0-ray2.60.0-py311-gpu

DOCKER_BUILDKIT=1 docker build -f clusters/Dockerfile --build-arg AFM_RAY_VERSION="$version" -t "$tag" "$@" .
echo "built $tag"
if (( push )); then
  docker push "$tag"
fi

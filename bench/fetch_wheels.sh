#!/usr/bin/env bash
# Fill bench/wheels/ with the packages the GPU image lacks (it has jax, orbax, etils, absl, protobuf, ... but
# not grain, clu, ml_collections, tensorflow-datasets, array-record) and the CPU venv's flax/optax, for CPython 3.12 on
# manylinux x86_64, so bench/gpu_check.sh can install them there with no network. Run here, where pip works:
#     bash bench/fetch_wheels.sh            # then: run(carry=["bench/wheels"], command="bash bench/gpu_check.sh")
# Versions are those of the CPU venv (.venv), so both machines run the same code. The folder is git-ignored.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="$here/wheels"
mkdir -p "$dest"
PY=${PY:-python3}

# Packages with binary wheels (or pure-Python wheels): fetched for the GPU machine's platform.
binary=(
  grain==0.2.18 array-record==0.8.6 dm-tree==0.1.10
  ml-collections==1.1.0 clu==0.0.12 tensorflow-datasets==4.9.10
  immutabledict==4.3.1 simple-parsing==0.1.9 docstring-parser==0.18.0
  tensorflow-metadata==1.21.0 termcolor==3.3.0 toml==0.10.2
  portpicker==1.6.0 googleapis-common-protos==1.76.0
  # The image has flax and optax of its own (version unknown); these are the ones the code is tested with.
  flax==0.12.8 optax==0.2.8
)
# Pure-Python packages published only as source: built into a wheel here (any platform).
source_only=(promise==2.3)

platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 \
           manylinux_2_35_x86_64; do
  platforms+=(--platform "$tag")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest" "${binary[@]}"
"$PY" -m pip wheel -q --no-deps -w "$dest" "${source_only[@]}"

# Fail loudly if a package came twice (two versions stop the install on the GPU machine).
dupes=$(ls "$dest"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dupes" ]; then
  echo "error: several versions of: $dupes in $dest; delete the folder and run again" >&2
  exit 1
fi
echo "wheels in $dest ($(du -sh "$dest" | cut -f1)):"
ls "$dest"

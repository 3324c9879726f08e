#!/usr/bin/env bash
# Write a wheelhouse's MANIFEST.txt (sha256, size, path of every file: the top-level files
# and the prebuilt wheels under prebuilt/<key>/) and check its size.
#
#   tools/wheelhouse_manifest.sh DIR
#
# tools/install_offline.sh checks every listed file before it installs anything. Fails if
# DIR is over WHEELHOUSE_MAX_MIB (default 60; the GPU node's carry holds 64 MiB).
set -euo pipefail

dir="${1:?usage: tools/wheelhouse_manifest.sh DIR}"
[ -d "$dir" ] || { echo "wheelhouse_manifest.sh: error: $dir is not a folder" >&2; exit 2; }
max_mib="${WHEELHOUSE_MAX_MIB:-60}"
(cd "$dir" && { find . -maxdepth 1 -type f ! -name 'MANIFEST.txt*' -printf '%P\n'
                [ ! -d prebuilt ] || find prebuilt -mindepth 2 -maxdepth 2 -type f -name '*.whl'; } | sort |
   while read -r f; do
     printf '%s  %10d  %s\n' "$(sha256sum "$f" | cut -c1-64)" "$(stat -c %s "$f")" "$f"
   done) > "$dir/MANIFEST.txt.new"
mv "$dir/MANIFEST.txt.new" "$dir/MANIFEST.txt"
total=$(du -sb "$dir" | cut -f1)
mib=$(( (total + 1048575) / 1048576 ))
prebuilt=$(grep -c ' prebuilt/' "$dir/MANIFEST.txt" || true)
echo "wheelhouse_manifest.sh: $(grep -c . "$dir/MANIFEST.txt") files ($prebuilt prebuilt MinkowskiEngine wheels), ${mib} MiB in $dir"
[ "$mib" -le "$max_mib" ] || { echo "wheelhouse_manifest.sh: error: the wheelhouse is ${mib} MiB, over the ${max_mib} MiB limit (WHEELHOUSE_MAX_MIB)" >&2; exit 2; }

#!/usr/bin/env bash
# Rewrites one patch of the series from edited files: applies the patches before it to a copy of
# the pinned tree, commits, copies the given files over from a worked-on tree, and writes the
# commit as a `git format-patch` file with the message from MSG_FILE.
#
#   scripts/regen-patch.sh PATCH_NAME WORK_TREE MSG_FILE FILE...   (FILE: path inside the tree)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
name=$1 work=$2 msg=$3; shift 3
tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' EXIT
cp -r "$("$root/scripts/pinned-tree.sh")" "$tmp/t"
cd "$tmp/t"
export GIT_CEILING_DIRECTORIES=$tmp GIT_AUTHOR_NAME="kvtuner developers" GIT_AUTHOR_EMAIL=dev@kvtuner.invalid \
    GIT_COMMITTER_NAME="kvtuner developers" GIT_COMMITTER_EMAIL=dev@kvtuner.invalid
git init -q && git add -A && git commit -q -m upstream
while read -r p; do
    [ "$p" = "$name" ] && break
    case $p in '#'* | '') continue ;; esac
    git apply -p1 "$root/patches/$p" && git add -A && git commit -q -m "$p"
done < "$root/patches/series"
for f in "$@"; do mkdir -p "$(dirname "$f")" && cp "$work/$f" "$f"; done
git add -A && git commit -q -F "$msg"
git format-patch -1 --stdout > "$root/patches/$name"
echo "wrote patches/$name: $(git diff --stat HEAD~1 | tail -1)"

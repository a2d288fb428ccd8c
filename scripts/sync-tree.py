#!/usr/bin/env python3
"""Makes DEST a copy of NEW, copying only the files whose content changed (with a new mtime) and
removing files NEW no longer has, so ninja and ccache see only real changes.

    scripts/sync-tree.py NEW DEST
"""
import filecmp
import os
import shutil
import sys

new, dest = sys.argv[1:]
for d, _, files in os.walk(new):
    for f in files:
        a = os.path.join(d, f)
        b = os.path.join(dest, os.path.relpath(a, new))
        if not os.path.exists(b) or not filecmp.cmp(a, b, shallow=False):
            os.makedirs(os.path.dirname(b), exist_ok=True)
            shutil.copy2(a, b)
            os.utime(b)
for d, _, files in os.walk(dest):  # files a patch no longer adds
    for f in files:
        b = os.path.join(d, f)
        if not os.path.exists(os.path.join(new, os.path.relpath(b, dest))):
            os.remove(b)

#!/usr/bin/env python3
"""Prints each function's arm64 binary and zip size (after `make build`) and fails when a zip is
over the limit: 5 MiB, or MAX_ZIP_MIB. A small zip is a fast cold start (Lambda fetches and
unpacks it before the first byte of the function runs)."""
import os
import sys
import zipfile

limit_mib = float(os.environ.get("MAX_ZIP_MIB", "5"))
over = []
for function in sys.argv[1:]:
    path = f"target/lambda/{function}/bootstrap.zip"
    if not os.path.exists(path):
        sys.exit(f"{path} is missing: build it first (make build)")
    zipped = os.path.getsize(path) / 2**20
    binary = zipfile.ZipFile(path).infolist()[0].file_size / 2**20
    print(f"  {function:<10} binary {binary:5.1f} MiB   zip {zipped:5.2f} MiB")
    if zipped > limit_mib:
        over.append(f"{function} ({zipped:.2f} MiB)")
if over:
    sys.exit(f"over the {limit_mib:g} MiB zip limit: {', '.join(over)}")

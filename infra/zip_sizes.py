#!/usr/bin/env python3
"""Prints each function's arm64 binary and zip size and fails when a zip is over the limit: 5 MiB,
or MAX_ZIP_MIB. A small zip is a fast cold start (Lambda fetches and unpacks it before the first
byte of the function runs).

    python3 infra/zip_sizes.py ingest generator ...         # make build's target/lambda/F/bootstrap.zip
    python3 infra/zip_sizes.py --sam ingest generator ...   # sam build's .aws-sam/build/FFunction/bootstrap,
                                                             # zipped as sam deploy zips it
"""
import io
import os
import sys
import zipfile

limit_mib = float(os.environ.get("MAX_ZIP_MIB", "5"))
args = sys.argv[1:]
sam = "--sam" in args
functions = [a for a in args if a != "--sam"]


def sam_zip(path: str) -> tuple[float, float]:
    """The binary's size and its zip's, deflated as `sam deploy` packages a build directory."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.write(path, "bootstrap")
    return os.path.getsize(path) / 2**20, len(buffer.getvalue()) / 2**20


over = []
for function in functions:
    if sam:
        path = f".aws-sam/build/{function[:1].upper()}{function[1:]}Function/bootstrap"
        if not os.path.exists(path):
            sys.exit(f"{path} is missing: run sam build first")
        binary, zipped = sam_zip(path)
    else:
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

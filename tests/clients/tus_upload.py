"""Uploads a file to DataFlow's /v1/uploads with tuspy, the tus project's Python client.

usage: tus_upload.py ENDPOINT KEY FILE [--stop-at BYTES] [--url UPLOAD_URL]

Prints the upload's URL and the offset reached. `--stop-at` stops once that many bytes are
stored (an interrupted upload); `--url` resumes an upload from where the server says it is.
Each part carries an Upload-Checksum (tuspy's sha1).
"""

import argparse
import os

from tusclient import client

parser = argparse.ArgumentParser()
parser.add_argument("endpoint")
parser.add_argument("key")
parser.add_argument("file")
parser.add_argument("--stop-at", type=int, default=None)
parser.add_argument("--url", default=None)
args = parser.parse_args()

tus = client.TusClient(args.endpoint, headers={"Authorization": "Bearer " + args.key})
uploader = tus.uploader(
    args.file,
    chunk_size=256 * 1024,
    metadata={"filename": os.path.basename(args.file)},
    url=args.url,
    upload_checksum=True,
)
if args.stop_at is None:
    uploader.upload()
else:
    uploader.upload(stop_at=args.stop_at)
print(uploader.url)
print(uploader.offset)

"""A local stand-in for the Hugging Face Hub's file endpoint, for tests without internet.

  fake_hub.py ROOT PORT_FILE

Serves ROOT/<org>/<name>/<file> at /<org>/<name>/resolve/<revision>/<file> (HEAD and GET, with
Range), with the headers both hf-hub (Rust) and huggingface_hub (Python) read: X-Repo-Commit,
ETag, Content-Length, Content-Range. Writes the port it listens on to PORT_FILE.
"""
import hashlib
import http.server
import os
import re
import sys

ROOT = sys.argv[1]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _target(self):
        m = re.match(r"^/([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$", self.path.split("?")[0])
        if not m:
            return None, None
        org, name, _rev, file = m.groups()
        commit = hashlib.sha1(f"{org}/{name}".encode()).hexdigest()
        path = os.path.join(ROOT, org, name, file)
        return (path if os.path.isfile(path) else None), commit

    def _respond(self, body):
        path, commit = self._target()
        if path is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = open(path, "rb").read()
        etag = hashlib.sha256(data).hexdigest()
        start, end = 0, len(data) - 1
        rng = self.headers.get("Range")
        status = 200
        if rng:
            m = re.match(r"bytes=(\d+)-(\d*)", rng)
            start = int(m.group(1))
            end = min(int(m.group(2)), len(data) - 1) if m.group(2) else len(data) - 1
            status = 206
        chunk = data[start:end + 1]
        self.send_response(status)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{etag}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(chunk)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        if body:
            self.wfile.write(chunk)

    def do_HEAD(self):
        self._respond(False)

    def do_GET(self):
        self._respond(True)


if __name__ == "__main__":
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with open(sys.argv[2] + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    os.replace(sys.argv[2] + ".tmp", sys.argv[2])
    server.serve_forever()

"""A local stand-in for the Hugging Face Hub, enough for huggingface_hub's upload path.

No maintained library serves the Hub's write API offline, so the tests run this small HTTP
server on 127.0.0.1 and point ``HF_ENDPOINT`` at it; the real client (huggingface_hub 2.x) then
does the upload. Endpoints, as the pinned huggingface_hub calls them (docs/versions.md):

* ``POST /api/repos/create``                               create_repo
* ``POST /api/validate-yaml``                               a README.md's YAML, before a commit
* ``POST /api/{type}s/{org}/{name}/branch/{branch}``          create_branch
* ``POST /api/{type}s/{org}/{name}/preupload/{revision}``     upload mode per file (regular / lfs)
* ``POST /[{type}s/]{org}/{name}.git/info/lfs/objects/batch`` LFS batch ("basic" transfer)
* ``PUT  /lfs-upload/{sha256}``                             the LFS object itself
* ``POST /api/{type}s/{org}/{name}/commit/{revision}``        ndjson commit
* ``GET  /api/{type}s/{org}/{name}/revision/{rev}``, ``.../tree/{rev}``, ``HEAD/GET .../resolve/{rev}/{path}``
                                                            snapshot_download (repo_info, list_repo_tree, files)

The Xet path cannot be served here: clients must run with ``HF_HUB_DISABLE_XET=1``.
Every request needs ``Authorization: Bearer <token>``. ``fail`` maps an endpoint name
(create, branch, preupload, lfs, upload, commit) to an HTTP status the server answers instead.
``hold`` maps an endpoint name to a condition: the first request to that endpoint waits (at most
``hold_timeout_s``) until the condition is true, like a slow network at a chosen moment.
The server stops by itself after ``lifetime_s`` even if a test forgets to stop it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

LFS_THRESHOLD = 1024  # files at least this big go through LFS, so both upload paths are exercised


class FakeHub:
    def __init__(self, token: str = "hf_fake_write_token", fail: dict[str, int] | None = None,
                 lifetime_s: float = 120.0, hold: dict[str, Callable[[], bool]] | None = None,
                 hold_timeout_s: float = 60.0):
        self.token = token
        self.fail = dict(fail or {})
        self.hold = dict(hold or {})
        self.hold_timeout_s = hold_timeout_s
        self.held: list[str] = []  # endpoints whose first request was held (and for how long, below)
        self.repos: dict[tuple[str, str], dict] = {}  # (type, id) -> {"private", "branches": {name: {path: bytes}}}
        self.commits: list[dict] = []  # {"repo", "type", "revision", "summary", "paths", "oid"}
        self.requests: list[tuple[str, str]] = []
        self.lfs_objects: dict[str, bytes] = {}
        self.validated: list[dict] = []  # YAML headers of cards sent to /api/validate-yaml
        self.lock = threading.Lock()
        self.lifetime_s = lifetime_s
        self._server: ThreadingHTTPServer | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._timer = threading.Timer(self.lifetime_s, self._server.shutdown)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def wait_if_held(self, endpoint_name: str) -> None:
        condition = self.hold.pop(endpoint_name, None)  # first request only
        if condition is None:
            return
        start = time.monotonic()
        while not condition() and time.monotonic() - start < self.hold_timeout_s:
            time.sleep(0.05)
        self.held.append(f"{endpoint_name} {time.monotonic() - start:.1f}s")

    # ---- what arrived ----------------------------------------------------------------------
    def files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        return dict(self.repos[(repo_type, repo_id)]["branches"][revision])

    def files_at(self, repo_id: str, commit_oid: str, repo_type: str = "model") -> dict[str, bytes]:
        """The repository's files as that commit left them."""
        return dict(self.repos[(repo_type, repo_id)]["snapshots"][commit_oid])

    def write_repo(self, repo_id: str, directory: Path, repo_type: str = "model", revision: str = "main") -> Path:
        """Materialise the repository's files under ``directory`` (like a clone)."""
        for path, data in self.files(repo_id, repo_type, revision).items():
            target = Path(directory) / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return Path(directory)


def _tree_entry(name: str, data: bytes) -> dict:
    entry = {"type": "file", "path": name, "size": len(data),
             "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}  # git's blob id
    if len(data) >= LFS_THRESHOLD:
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    # ---- plumbing ----------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reply(self, status: int, payload=None) -> None:
        data = json.dumps(payload if payload is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status >= 400:
            self.send_header("X-Error-Message", (payload or {}).get("error", "error"))
        self.end_headers()
        if self.command != "HEAD":  # a HEAD reply has no body: one would corrupt the next response
            self.wfile.write(data)

    def _authorised(self, endpoint_name: str) -> bool:
        if self.headers.get("Authorization") != f"Bearer {self.hub.token}":
            self._reply(401, {"error": "Invalid credentials in Authorization header"})
            return False
        status = self.hub.fail.get(endpoint_name)
        if status:
            self._reply(status, {"error": f"fake hub: {endpoint_name} answers {status}"})
            return False
        return True

    def _repo(self, repo_type: str, repo_id: str) -> dict | None:
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None:
            self._reply(404, {"error": f"Repository not found: {repo_type} {repo_id}"})
        return repo

    # ---- routes ------------------------------------------------------------------------------
    def do_POST(self) -> None:
        path = unquote(urlsplit(self.path).path)
        body = self._body()
        self.hub.requests.append(("POST", path))
        if path == "/api/repos/create":
            if not self._authorised("create"):
                return
            payload = json.loads(body)
            repo_type = payload.get("type") or "model"
            repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            with self.hub.lock:
                if (repo_type, repo_id) in self.hub.repos:
                    return self._reply(409, {"error": "You already created this repo",
                                             "url": self._url(repo_type, repo_id)})
                self.hub.repos[(repo_type, repo_id)] = {
                    "private": payload.get("visibility") == "private" or bool(payload.get("private")),
                    "branches": {"main": {}},
                    "heads": {},       # branch -> sha of its last commit
                    "snapshots": {},   # commit sha -> files at that commit
                }
            return self._reply(200, {"url": self._url(repo_type, repo_id), "name": repo_id, "id": repo_id})
        if path == "/api/validate-yaml":  # create_commit checks a README.md's YAML header first
            if not self._authorised("validate"):
                return
            content = json.loads(body)["content"]
            try:
                header = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else {}
                assert isinstance(header, dict), "the YAML header is not a mapping"
            except Exception as error:  # noqa: BLE001 - any parse failure is the Hub's 400 reply
                return self._reply(400, {"error": "Invalid metadata", "errors": [{"message": str(error)}]})
            self.hub.validated.append(header)
            return self._reply(200, {"warnings": []})
        if match := re.fullmatch(r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)\.git/info/lfs/objects/batch", path):
            if not self._authorised("lfs"):
                return
            self.hub.wait_if_held("lfs")
            payload = json.loads(body)
            objects = [
                {"oid": o["oid"], "size": o["size"], "authenticated": True,
                 "actions": {"upload": {"href": f"{self.hub.endpoint}/lfs-upload/{o['oid']}"}}}
                for o in payload["objects"] if o["oid"] not in self.hub.lfs_objects
            ] + [{"oid": o["oid"], "size": o["size"]} for o in payload["objects"] if o["oid"] in self.hub.lfs_objects]
            return self._reply(200, {"transfer": "basic", "objects": objects})
        match = re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)", path)
        if not match:
            return self._reply(404, {"error": f"fake hub: no route for POST {path}"})
        repo_type, repo_id, action, revision = match.group(1)[:-1], match.group(2), match.group(3), match.group(4)
        if not self._authorised(action):
            return
        repo = self._repo(repo_type, repo_id)
        if repo is None:
            return
        if action == "branch":
            if revision in repo["branches"]:
                return self._reply(409, {"error": "Reference already exists"})
            repo["branches"][revision] = dict(repo["branches"]["main"])
            return self._reply(200, {})
        if revision not in repo["branches"]:
            return self._reply(404, {"error": f"Invalid rev id: {revision}"})
        if action == "preupload":
            files = [
                {"path": f["path"], "uploadMode": "lfs" if f["size"] >= LFS_THRESHOLD else "regular",
                 "shouldIgnore": False}
                for f in json.loads(body)["files"]
            ]
            return self._reply(200, {"files": files, "commitOid": "0" * 40})
        # commit: one JSON object per line (huggingface_hub's _prepare_commit_payload)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        new_files: dict[str, bytes] = {}
        deleted: list[str] = []
        for item in lines:
            value = item["value"]
            if item["key"] == "file":
                new_files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                data = self.hub.lfs_objects.get(value["oid"])
                if data is None:
                    return self._reply(400, {"error": f"LFS object {value['oid']} was never uploaded"})
                new_files[value["path"]] = data
            elif item["key"] in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
        header = lines[0]["value"]
        with self.hub.lock:
            tree = repo["branches"][revision]
            for gone in deleted:
                for name in [p for p in tree if p == gone or p.startswith(gone.rstrip("/") + "/")]:
                    del tree[name]
            tree.update(new_files)
            oid = hashlib.sha1(f"{repo_id}{len(self.hub.commits) + 1}".encode()).hexdigest()
            self.hub.commits.append({"repo": repo_id, "type": repo_type, "revision": revision,
                                     "summary": header.get("summary"), "paths": sorted(new_files), "oid": oid})
            repo["heads"][revision] = oid
            repo["snapshots"][oid] = dict(tree)
        return self._reply(200, {"success": True, "commitOid": oid,
                                 "commitUrl": f"{self._url(repo_type, repo_id)}/commit/{oid}",
                                 "pullRequestUrl": None})

    def do_PUT(self) -> None:
        path = urlsplit(self.path).path
        body = self._body()
        self.hub.requests.append(("PUT", path))
        match = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)
        if not match:
            return self._reply(404, {"error": f"fake hub: no route for PUT {path}"})
        status = self.hub.fail.get("upload")
        if status:
            return self._reply(status, {"error": f"fake hub: upload answers {status}"})
        if hashlib.sha256(body).hexdigest() != match.group(1):
            return self._reply(400, {"error": "sha256 mismatch"})
        self.hub.lfs_objects[match.group(1)] = body
        return self._reply(200, {})

    # ---- downloads (snapshot_download: repo_info, list_repo_tree, then each file) --------------
    def do_HEAD(self) -> None:
        self._download(head=True)

    def do_GET(self) -> None:
        self._download(head=False)

    def _download(self, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self._body()
        self.hub.requests.append(("HEAD" if head else "GET", path))
        if match := re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?", path):
            repo_type, repo_id, what, revision = match.group(1)[:-1], match.group(2), match.group(3), match.group(4)
            if not self._authorised("download"):
                return
            repo = self._repo(repo_type, repo_id)
            if repo is None:
                return
            sha, tree = self._resolve(repo, revision)
            if tree is None:
                return self._reply(404, {"error": f"Invalid rev id: {revision}"})
            if what == "revision":
                return self._reply(200, {"id": repo_id, "sha": sha, "private": repo["private"],
                                         "siblings": [{"rfilename": name} for name in sorted(tree)]})
            prefix = (match.group(5) or "").strip("/")
            entries = [_tree_entry(name, data) for name, data in sorted(tree.items())
                       if not prefix or name.startswith(prefix + "/")]
            folders = sorted({"/".join(name.split("/")[:i]) for name in tree for i in range(1, name.count("/") + 1)})
            entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in folders]
            return self._reply(200, entries)
        match = re.fullmatch(r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if not match:
            return self._reply(404, {"error": f"fake hub: no route for GET {path}"})
        if not self._authorised("download"):
            return
        repo = self._repo((match.group(1) or "models")[:-1], match.group(2))
        if repo is None:
            return
        sha, tree = self._resolve(repo, match.group(3))
        data = (tree or {}).get(match.group(4))
        if data is None:
            return self._reply(404, {"error": "Entry not found"})
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Repo-Commit", sha)
        self.send_header("ETag", f'"{_tree_entry(match.group(4), data)["oid"]}"')
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _resolve(self, repo: dict, revision: str) -> tuple[str, dict | None]:
        """A branch name or a commit sha -> (commit sha, files)."""
        if revision in repo["branches"]:
            return repo["heads"].get(revision, "0" * 40), repo["branches"][revision]
        snapshot = repo["snapshots"].get(revision)
        return revision, snapshot

    def _url(self, repo_type: str, repo_id: str) -> str:
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return f"{self.hub.endpoint}/{prefix}{repo_id}"

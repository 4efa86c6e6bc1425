"""A minimal Hub upload server for tests: what huggingface_hub 2.4's `create_repo` and
`upload_folder` call, backed by real git repos (`<mirrors>/models/<org>/<name>/.git`) that
olah then serves for downloads, so a push can be pulled back.

Endpoints (read from huggingface_hub's hf_api.py / _commit_api.py / lfs.py):
    POST /api/repos/create                      {name, organization, visibility, type} -> {url}; 409 if it exists
    POST /api/validate-yaml                     {content, repoType} -> {errors, warnings}; 400 on bad front matter
    POST /api/models/{repo}/preupload/{rev}     {files: [{path, sample, size}]} -> uploadMode:
        "lfs" as on the Hub (a `filter=lfs` pattern of .gitattributes, >= 10 MiB, or a NUL byte in
        the sample), else "regular"
    POST /{repo}.git/info/lfs/objects/batch     git-lfs batch API, basic transfer: upload and verify
        actions pointing back here; no actions for an object already stored
    PUT  /{repo}.git/info/lfs/objects/{oid}     the object's bytes; no auth (the Hub hands out
        presigned URLs) but only for an oid a batch announced; 400 unless they hash to oid and
        have its size
    POST /{repo}.git/info/lfs/objects/verify    {oid, size} -> 200 when stored
    POST /api/models/{repo}/commit/{rev}        NDJSON: header, file (base64), lfsFile (path,
        algo, oid, size; 422 unless uploaded), deletedFile -> {commitOid, commitUrl}

LFS files are stored as git-lfs does: a pointer blob in git, the bytes in `.git/lfs/objects/`,
which olah resolves when it serves the file. The client must not use Xet (set
`huggingface_hub.constants.HF_HUB_DISABLE_XET`): the Xet endpoints answer 501.

Loopback only; when `token` is set every request but the object PUT must carry
`Authorization: Bearer <token>`.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

GIT = ["git", "-c", "user.name=loradock-test", "-c", "user.email=test@loradock.invalid"]
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.onnx", "*.zip")
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS)
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub sends files this large through LFS whatever their name
_REPO_ROUTE = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)/(?P<action>preupload|commit)/(?P<rev>.+)")
_LFS_ROUTE = re.compile(
    r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/(?P<action>batch|verify|[0-9a-f]{64})"
)
_XET_ROUTE = re.compile(r"/api/models/[^/]+/[^/]+/xet-(read|write)-token(/.*)?")
_OID = re.compile(r"[0-9a-f]{64}")


def git(repo: Path, *args: str) -> str:
    return subprocess.run([*GIT, *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def init_repo(path: Path) -> None:
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")


def commit_files(repo: Path, files: dict[str, bytes], message: str, deleted: tuple[str, ...] = ()) -> str:
    """Write `files`, remove `deleted`, commit everything on the current branch; return the sha."""
    for rel, data in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_bytes(data)
    for rel in deleted:
        (repo / rel).unlink()
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--allow-empty", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def lfs_pointer(oid: str, size: int) -> bytes:
    """The git-lfs pointer file for an object (spec v1), as the Hub keeps it in git."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


class HubUploadServer:
    """Serve the upload API on 127.0.0.1 in a thread. Use as a context manager."""

    def __init__(self, mirrors: Path, token: str | None = None) -> None:
        self.mirrors = Path(mirrors)
        self.token = token
        self.requests: list[tuple[str, str]] = []  # (method, path) in arrival order
        # one entry per commit made: {"repo", "sha", "lfs": [paths], "regular": [paths]}
        self.commits: list[dict] = []
        self._announced: set[tuple[str, str, int]] = set()  # (repo, oid, size) a batch let PUT
        self._git_lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubUploadServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def repo_dir(self, repo_id: str) -> Path:
        return self.mirrors / "models" / repo_id

    def lfs_object(self, repo_id: str, oid: str) -> Path:
        """Where an uploaded LFS object lives (git-lfs' layout, which olah reads)."""
        return self.repo_dir(repo_id) / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid

    # ----- request handling (called from the handler)

    def create_repo(self, body: dict) -> tuple[int, dict]:
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        if "/" not in repo_id:
            return 400, {"error": "this test server needs an org/name repo id"}
        path = self.repo_dir(repo_id)
        with self._git_lock:
            if path.exists():
                return 409, {"error": "You already created this model repo", "url": f"{self.endpoint}/{repo_id}"}
            init_repo(path)
            commit_files(path, {".gitattributes": GITATTRIBUTES.encode()}, "initial commit")
        return 200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id}

    @staticmethod
    def validate_yaml(body: dict) -> tuple[int, dict]:
        match = re.match(r"---\n(.*?)\n---\n", body.get("content", ""), re.DOTALL)
        try:
            if match:
                yaml.safe_load(match.group(1))
        except yaml.YAMLError as e:
            return 400, {"errors": [{"message": f"invalid YAML: {e}"}], "warnings": []}
        return 200, {"errors": [], "warnings": []}

    def preupload(self, repo_id: str, body: dict) -> tuple[int, dict]:
        attributes = self.repo_dir(repo_id) / ".gitattributes"
        if not attributes.parent.is_dir():
            return 404, {"error": f"Repository {repo_id} not found"}
        text = attributes.read_text() if attributes.exists() else ""
        rules = [line.split() for line in text.splitlines()]
        lfs_patterns = [rule[0] for rule in rules if "filter=lfs" in rule[1:]]

        def mode(f: dict) -> str:
            binary = b"\0" in base64.b64decode(f.get("sample", ""))
            by_name = any(fnmatch.fnmatch(Path(f["path"]).name, p) for p in lfs_patterns)
            return "lfs" if by_name or binary or f["size"] >= LFS_MIN_SIZE else "regular"

        files = [{"path": f["path"], "uploadMode": mode(f), "shouldIgnore": False, "oid": None}
                 for f in body["files"]]
        return 200, {"files": files}

    def lfs_batch(self, repo_id: str, body: dict) -> tuple[int, dict]:
        if not self.repo_dir(repo_id).is_dir():
            return 404, {"message": f"Repository {repo_id} not found"}
        if body.get("operation") != "upload" or body.get("hash_algo", "sha256") != "sha256":
            return 422, {"message": "this test server only takes sha256 uploads"}
        if "basic" not in body.get("transfers", ["basic"]):
            return 422, {"message": "this test server only speaks the basic transfer"}
        base = f"{self.endpoint}/{repo_id}.git/info/lfs/objects"
        objects = []
        for obj in body["objects"]:
            oid, size = obj.get("oid"), obj.get("size")
            if not (isinstance(oid, str) and _OID.fullmatch(oid) and isinstance(size, int)):
                error = {"code": 422, "message": "oid must be a sha256 and size an int"}
                objects.append({"oid": str(oid), "size": -1, "error": error})
                continue
            entry = {"oid": oid, "size": size, "authenticated": True}
            stored = self.lfs_object(repo_id, oid)
            if not (stored.exists() and stored.stat().st_size == size):  # else: nothing to upload
                self._announced.add((repo_id, oid, size))
                entry["actions"] = {"upload": {"href": f"{base}/{oid}"},
                                    "verify": {"href": f"{base}/verify"}}
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def lfs_put(self, repo_id: str, oid: str, data: bytes) -> tuple[int, dict]:
        sizes = [size for repo, o, size in self._announced if (repo, o) == (repo_id, oid)]
        if not sizes:
            return 403, {"message": f"no batch request announced object {oid} for {repo_id}"}
        if len(data) not in sizes:
            return 400, {"message": f"object {oid}: got {len(data)} bytes, announced {sizes}"}
        actual = hashlib.sha256(data).hexdigest()
        if actual != oid:
            return 400, {"message": f"object {oid}: the uploaded bytes hash to sha256 {actual}"}
        target = self.lfs_object(repo_id, oid)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{oid}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        return 200, {}

    def lfs_verify(self, repo_id: str, body: dict) -> tuple[int, dict]:
        oid, size = body.get("oid", ""), body.get("size")
        stored = self.lfs_object(repo_id, oid) if _OID.fullmatch(str(oid)) else None
        if stored is None or not stored.exists():
            return 404, {"message": f"object {oid} was not uploaded"}
        if stored.stat().st_size != size:
            return 422, {"message": f"object {oid} has {stored.stat().st_size} bytes, not {size}"}
        return 200, {}

    def commit(self, repo_id: str, rev: str, lines: list[dict]) -> tuple[int, dict]:
        path = self.repo_dir(repo_id)
        if not path.is_dir():
            return 404, {"error": f"Repository {repo_id} not found"}
        if rev != "main":
            return 400, {"error": "this test server commits to main only"}
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        files, deleted, lfs_paths = {}, [], []
        for line in lines:
            value = line["value"]
            if line["key"] == "file":
                if value.get("encoding") != "base64":
                    return 400, {"error": f"unsupported encoding {value.get('encoding')!r}"}
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                oid = value.get("oid", "")
                if value.get("algo") != "sha256" or not _OID.fullmatch(oid):
                    what = "lfsFile needs algo sha256 and a sha256 oid"
                    return 400, {"error": f"{value['path']}: {what}"}
                stored = self.lfs_object(repo_id, oid)
                if not stored.exists():
                    return 422, {"error": f"{value['path']}: LFS object {oid} was never uploaded"}
                size = stored.stat().st_size
                if value.get("size", size) != size:
                    what = f"LFS object {oid} has {size} bytes, not {value['size']}"
                    return 422, {"error": f"{value['path']}: {what}"}
                files[value["path"]] = lfs_pointer(oid, size)
                lfs_paths.append(value["path"])
            elif line["key"] == "deletedFile":
                deleted.append(value["path"])
            elif line["key"] != "header":
                return 400, {"error": f"unsupported commit operation {line['key']!r}"}
        regular = sorted(set(files) - set(lfs_paths))
        with self._git_lock:
            sha = commit_files(path, files, header.get("summary") or "upload", tuple(deleted))
            self.commits.append(
                {"repo": repo_id, "sha": sha, "lfs": sorted(lfs_paths), "regular": regular}
            )
        return 200, {"commitOid": sha, "commitUrl": f"{self.endpoint}/{repo_id}/commit/{sha}"}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def _reply(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if status >= 400:  # as the Hub does; the client shows it, not git-lfs' "message"
                    message = payload.get("error") or payload.get("message", "")
                    self.send_header("X-Error-Message", message)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                chunks = []  # a streamed upload body may come chunked
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(chunks)

            def _authorized(self) -> bool:
                expected = f"Bearer {server.token}"
                return not server.token or self.headers.get("Authorization") == expected

            def do_POST(self) -> None:
                path = unquote(urlsplit(self.path).path)
                server.requests.append(("POST", path))
                raw = self._body()
                if not self._authorized():
                    return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                if path == "/api/repos/create":
                    return self._reply(*server.create_repo(json.loads(raw)))
                if path == "/api/validate-yaml":
                    return self._reply(*server.validate_yaml(json.loads(raw)))
                m = _REPO_ROUTE.fullmatch(path)
                if m and m["action"] == "preupload":
                    return self._reply(*server.preupload(m["repo"], json.loads(raw)))
                if m and m["action"] == "commit":
                    lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
                    return self._reply(*server.commit(m["repo"], m["rev"], lines))
                m = _LFS_ROUTE.fullmatch(path)
                if m and m["action"] == "batch":
                    return self._reply(*server.lfs_batch(m["repo"], json.loads(raw)))
                if m and m["action"] == "verify":
                    return self._reply(*server.lfs_verify(m["repo"], json.loads(raw)))
                return self._not_found("POST", path)

            def do_PUT(self) -> None:
                path = unquote(urlsplit(self.path).path)
                server.requests.append(("PUT", path))
                raw = self._body()
                m = _LFS_ROUTE.fullmatch(path)
                if m and _OID.fullmatch(m["action"]):
                    return self._reply(*server.lfs_put(m["repo"], m["action"], raw))
                return self._not_found("PUT", path)

            def do_GET(self) -> None:
                path = unquote(urlsplit(self.path).path)
                server.requests.append(("GET", path))
                if _XET_ROUTE.fullmatch(path):  # the client asks for a Xet token this way
                    return self._not_found("GET", path)
                self._reply(404, {"error": "downloads are served by olah, not this server"})

            def _not_found(self, method: str, path: str) -> None:
                if _XET_ROUTE.fullmatch(path):
                    hint = "set huggingface_hub.constants.HF_HUB_DISABLE_XET"
                    error = f"this test server speaks git-lfs, not Xet: {hint}"
                    return self._reply(501, {"error": error})
                self._reply(404, {"error": f"no route for {method} {path}"})

        return Handler

"""A minimal Hub upload server for tests: what huggingface_hub 2.4's `create_repo` and
`upload_folder` call, backed by real git repos (`<mirrors>/models/<org>/<name>/.git`) that
olah then serves for downloads, so a push can be pulled back.

Endpoints (read from huggingface_hub's hf_api.py / _commit_api.py):
    POST /api/repos/create                      {name, organization, visibility, type} -> {url}; 409 if it exists
    POST /api/validate-yaml                     {content, repoType} -> {errors, warnings}; 400 on bad front matter
    POST /api/models/{repo}/preupload/{rev}     {files: [{path, sample, size}]} -> every file "regular"
    POST /api/models/{repo}/commit/{rev}        NDJSON: header, file (base64), deletedFile -> {commitOid, commitUrl}

Loopback only; when `token` is set every request must carry `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

GIT = ["git", "-c", "user.name=loradock-test", "-c", "user.email=test@loradock.invalid"]
_REPO_ROUTE = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)/(?P<action>preupload|commit)/(?P<rev>.+)")


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


class HubUploadServer:
    """Serve the upload API on 127.0.0.1 in a thread. Use as a context manager."""

    def __init__(self, mirrors: Path, token: str | None = None) -> None:
        self.mirrors = Path(mirrors)
        self.token = token
        self.requests: list[tuple[str, str]] = []  # (method, path) in arrival order
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
            commit_files(path, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                         "initial commit")
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

    @staticmethod
    def preupload(body: dict) -> tuple[int, dict]:
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                 for f in body["files"]]
        return 200, {"files": files}

    def commit(self, repo_id: str, rev: str, lines: list[dict]) -> tuple[int, dict]:
        path = self.repo_dir(repo_id)
        if not path.is_dir():
            return 404, {"error": f"Repository {repo_id} not found"}
        if rev != "main":
            return 400, {"error": "this test server commits to main only"}
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        files, deleted = {}, []
        for line in lines:
            value = line["value"]
            if line["key"] == "file":
                if value.get("encoding") != "base64":
                    return 400, {"error": f"unsupported encoding {value.get('encoding')!r}"}
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "deletedFile":
                deleted.append(value["path"])
            elif line["key"] != "header":
                return 400, {"error": f"unsupported commit operation {line['key']!r}"}
        with self._git_lock:
            sha = commit_files(path, files, header.get("summary") or "upload", tuple(deleted))
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
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                path = unquote(urlsplit(self.path).path)
                server.requests.append(("POST", path))
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if server.token and self.headers.get("Authorization") != f"Bearer {server.token}":
                    return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                if path == "/api/repos/create":
                    return self._reply(*server.create_repo(json.loads(raw)))
                if path == "/api/validate-yaml":
                    return self._reply(*server.validate_yaml(json.loads(raw)))
                m = _REPO_ROUTE.fullmatch(path)
                if m and m["action"] == "preupload":
                    return self._reply(*server.preupload(json.loads(raw)))
                if m and m["action"] == "commit":
                    lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
                    return self._reply(*server.commit(m["repo"], m["rev"], lines))
                return self._reply(404, {"error": f"no route for POST {path}"})

            def do_GET(self) -> None:
                server.requests.append(("GET", urlsplit(self.path).path))
                self._reply(404, {"error": "downloads are served by olah, not this server"})

        return Handler

"""`tuner ui` without a browser: the bind rule, credentials, upload safety, and the runs folder after a restart."""

from __future__ import annotations

import base64
import io
import json
import os
import urllib.error
import urllib.request

import pytest
from PIL import Image

from tuner.cli import main


def _request(url, method="GET", data=None, headers=None):
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def _png(size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buf, format="PNG")
    return buf.getvalue()


def test_non_loopback_without_auth_refuses_to_start(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["ui", "--host", "0.0.0.0", "--port", "7999", "--runs-dir", str(runs)]) == 1
    err = capsys.readouterr().err
    assert "--host 0.0.0.0" in err and "--auth" in err and "Traceback" not in err
    assert not runs.exists()  # refused before anything was built or bound

    from tuner.ui.server import check_bind, parse_auth

    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("0.0.0.0", parse_auth("me:secret"))  # with credentials it may


def test_auth_password_and_token_file(tmp_path, serve_app):
    from tuner.ui.server import parse_auth

    served = serve_app(tmp_path / "runs", parse_auth("me:pa:ss"))
    status, body, headers = _request(served.url + "/api/runs")
    assert status == 401 and "Basic" in headers.get("www-authenticate", "")
    assert _request(served.url + "/")[0] == 401
    wrong = base64.b64encode(b"me:nope").decode()
    assert _request(served.url + "/api/runs", headers={"Authorization": f"Basic {wrong}"})[0] == 401
    good = base64.b64encode(b"me:pa:ss").decode()
    assert _request(served.url + "/api/runs", headers={"Authorization": f"Basic {good}"})[:2] == (200, b"[]")

    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-value\n")
    served = serve_app(tmp_path / "runs2", parse_auth(str(token_file)))
    assert _request(served.url + "/api/meta")[0] == 401
    assert _request(served.url + "/api/meta", headers={"Authorization": "Bearer s3cret-token-value"})[0] == 200
    assert _request(served.url + "/api/meta", headers={"Authorization": "Bearer s3cret-token-valuX"})[0] == 401


def test_uploads_stay_in_the_run_folder(tmp_path, serve_app):
    root = tmp_path / "runs"
    served = serve_app(root, max_upload_mb=0.01)
    status, body, _ = _request(served.url + "/api/runs", "POST", json.dumps({"name": "../../evil"}).encode(),
                               {"Content-Type": "application/json"})  # fmt: skip
    run = json.loads(body)["name"]
    assert status == 200 and run == "evil"

    def put(name, data):
        url = f"{served.url}/api/runs/{run}/photos?filename={urllib.request.quote(name)}"
        return json.loads(_request(url, "PUT", data)[1])

    assert put("../../x.png", _png()) == {"original": "../../x.png", "name": "x.png", "reason": None, "detail": ""}
    assert put("..\\..\\x.png", _png((64, 65)))["name"] == "x-1.png"  # never overwrites an earlier photo
    assert put("notes.txt", b"hello")["reason"] == "missing file"  # a caption, but of no photo
    assert put("../x.txt", b"a red square\n")["name"] == "x.txt"
    assert put("notes.doc", b"hello")["reason"] == "not an image"
    assert put("big.png", _png() + b"\0" * 20_000)["reason"] == "too large"
    bomb = b"\x89PNG\r\n\x1a\n" + b"\0\0\0\rIHDR" + (30000).to_bytes(4, "big") * 2 + b"\x08\x02\0\0\0" + b"\0" * 4
    assert put("bomb.png", bomb)["reason"] == "decompression bomb"
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == [
        "runs/evil/photos/x-1.png",
        "runs/evil/photos/x.png",
        "runs/evil/photos/x.txt",
        "runs/evil/ui.json",
    ]
    assert (root / "evil/photos/x.txt").read_text() == "a red square\n"

    assert _request(f"{served.url}/api/runs/{run}/file?path=photos/../ui.json")[0] == 400
    assert _request(f"{served.url}/api/runs/{run}/file?path=photos/x.png")[0] == 200
    assert _request(f"{served.url}/api/runs/..%2F{run}")[0] in (400, 404)
    status, body, _ = _request(f"{served.url}/api/runs/{run}/caption", "PUT",
                               json.dumps({"photo": "../ui.json", "text": "x"}).encode(),
                               {"Content-Type": "application/json"})  # fmt: skip
    assert status == 400 and "no photo named" in json.loads(body)["error"]


def test_a_run_left_running_reads_as_interrupted(tmp_path):
    from tuner.ui.store import RunStore

    store = RunStore(tmp_path)
    run = store.create("left")
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    run.update(status="running", pid=dead)
    again = RunStore(tmp_path).get("left").state()
    assert again["status"] == "interrupted" and again["pid"] is None


@pytest.mark.parametrize("preset", ["micro-subject-lora", "micro-subject-ti"])
def test_advanced_fields_come_from_the_schema(preset):
    from tuner.config import RunConfig
    from tuner.presets import read_preset
    from tuner.ui.task import advanced_fields

    tables = advanced_fields(preset)
    method = read_preset(preset).info.method
    model = RunConfig.for_method(method)
    assert set(tables) == {"data", "optimizer", "train", "validation", "hub", method}
    keys = {f["key"]: f for rows in tables.values() for f in rows}
    assert keys["train.max_train_steps"]["value"] == read_preset(preset).table["train"]["max_train_steps"]
    assert keys["optimizer.name"]["choices"] == list(model.model_fields["optimizer"].annotation.model_fields["name"]
                                                      .annotation.__args__)  # fmt: skip
    assert "data.path" not in keys and "train.output_dir" not in keys  # the form's own
    assert all(f["doc"] for f in keys.values())


def test_a_second_run_waits_in_the_queue(tmp_path):
    """Real `tuner train` children, stopped while they start (nothing trains): the queue order and the states."""
    import time

    from tuner.ui.process import RunQueue
    from tuner.ui.store import RunStore
    from tuner.ui.task import DEFAULT_TASK

    store = RunStore(tmp_path)
    a, b, c = (store.create(name) for name in "abc")
    for run in (a, b, c):
        run.update(task=DEFAULT_TASK)
    queue = RunQueue(store)

    def wait(run, status):
        deadline = time.monotonic() + 30
        while run.state()["status"] != status:
            assert time.monotonic() < deadline, run.state()
            time.sleep(0.05)

    try:
        queue.enqueue(a, resume=False)
        assert queue.enqueue(b, resume=False)["message"] == "queued behind 1 run(s)"
        wait(a, "running")
        assert b.state()["status"] == "queued" and queue.position("b") == 1
        assert queue.enqueue(c, resume=False)["message"] == "queued behind 2 run(s)"
        assert queue.stop(c)["status"] == "new" and queue.position("c") is None
        queue.stop(a)
        wait(a, "stopped")
        wait(b, "running")
        assert "stopped before the first checkpoint" in a.state()["message"]
        queue.stop(b)
        wait(b, "stopped")
        assert "$ tuner train --preset micro-subject-lora" in a.log.read_text()
    finally:
        queue.close()


def test_a_bad_publish_request_does_not_echo_the_token(tmp_path, serve_app):
    served = serve_app(tmp_path / "runs")
    _, body, _ = _request(served.url + "/api/runs", "POST", b"{}", {"Content-Type": "application/json"})
    run = json.loads(body)["name"]
    secret = "hf_doNotEchoThis123"
    payload = json.dumps({"repo_id": "you/x", "token": secret, "private": "maybe"}).encode()
    status, body, _ = _request(f"{served.url}/api/runs/{run}/publish", "POST", payload,
                               {"Content-Type": "application/json"})  # fmt: skip
    assert status == 422 and b"private" in body and secret.encode() not in body
    payload = json.dumps({"repo_id": "you/x", "token": secret}).encode()
    status, body, _ = _request(f"{served.url}/api/runs/{run}/publish", "POST", payload,
                               {"Content-Type": "application/json"})  # fmt: skip
    assert status == 400 and b"has not finished" in body and secret.encode() not in body

"""The shard writer under hostile and careless input (issue "data-integrity"): real videos, real files, real tars,
real servers, real runs of the CLI.

Every case ends in a clear error (naming what to do) or a skip named with its input and reason, the other inputs
written; and a run changes nothing outside its output folder (`tree_state` before and after).
Resume and merge of --num-jobs runs, and no deletion of another run's output: test_hostile_writer_jobs.py.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from hostile_helpers import video_folder
from shard_helpers import tree_state

from data_pipeline.config import DataConfig
from data_pipeline.sidecar import MAX_SIDECAR_BYTES
from data_pipeline.stream import make_eval_loader
from data_pipeline.writer import inputs, write_shards
from data_pipeline.writer.cli import main

REPO = Path(__file__).resolve().parents[1]


def _members(folder: Path) -> list[str]:
    names = []
    for shard in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(shard, encoding="utf-8") as tar:
            names += tar.getnames()
    return names


@contextlib.contextmanager
def _only_output_changes(root: Path, *outputs: Path):
    """Asserts that nothing under `root` but `outputs` changed inside the block."""
    before = tree_state(root, exclude=outputs)
    yield
    assert tree_state(root, exclude=outputs) == before


# ---- one sidecar schema, enforced where data enters ------------------------------------------------------------


def _deep(levels: int) -> str:
    return '{"labels": {"digit0": 1}, "extra": ' + "[" * levels + "1" + "]" * levels + "}"


def _with(change):
    def edit(sidecar: dict) -> str:
        sidecar = json.loads(json.dumps(sidecar))
        change(sidecar)
        return json.dumps(sidecar)  # Python writes NaN / Infinity tokens: the careless tool's output

    return edit


BAD_SIDECARS = {
    "string_label": (
        _with(lambda s: s["labels"].update(digit0="walking")),
        "is the string 'walking'; labels are integers",
    ),
    "bool_label": (_with(lambda s: s["labels"].update(digit0=True)), "labels are integers"),
    "huge_label": (_with(lambda s: s["labels"].update(digit0=2**70)), "beyond int64's range"),
    "nan_state": (_with(lambda s: s["state"][3].__setitem__(0, float("nan"))), "holds NaN"),
    "infinite_action": (_with(lambda s: s["action"][0].__setitem__(1, float("inf"))), "holds Infinity"),
    "overflowing_number": (lambda s: json.dumps(s).replace("[[", "[[1e400, ", 1), "beyond float64 or not finite"),
    "beyond_float32": (_with(lambda s: s["state"][0].__setitem__(0, 1e308)), "beyond float32's range"),
    "infinite_num_frames": (_with(lambda s: s.update(num_frames=float("inf"))), "holds Infinity"),
    "deep_nesting": (lambda s: _deep(100_000), "nested too deeply"),
    "nesting_over_the_limit": (lambda s: _deep(40), "nested more than 32 levels"),
    "huge_integer_literal": (lambda s: '{"extra": ' + "9" * 5000 + "}", "not valid JSON"),
    "ragged_rows": (_with(lambda s: s["state"][2].append(0.5)), "row 2 has 9 columns, row 0 has 8"),
    "string_in_rows": (_with(lambda s: s["action"][1].__setitem__(0, "fast")), "holds 'fast', not a number"),
    "names_count": (_with(lambda s: s["state_names"].pop()), "'state_names' has 7 names for 8 columns"),
    "not_an_object": (lambda s: json.dumps([1, 2, 3]), "must be a JSON object"),
    "wider_state": (_with(lambda s: [s.pop("state_names"), *(r.append(0.0) for r in s["state"])]), "'state' has 9 col"),
    "other_label_names": (_with(lambda s: s.update(labels={"colour": 3})), "the labels are ['colour']; the dataset"),
    "events_not_numbers": (_with(lambda s: s["events"].__setitem__(0, [1])), "'events' entry 0"),
}


@pytest.mark.parametrize("kind", sorted(BAD_SIDECARS))
def test_a_bad_sidecar_is_skipped_with_its_reason_and_the_rest_written(clips, tmp_path, kind):
    make, reason = BAD_SIDECARS[kind]
    videos = video_folder(tmp_path / "videos", clips, ["a", "b"])
    (videos / "zz_bad.mp4").write_bytes(clips[2][0])  # sorted last: a and b fix the dataset's widths
    (videos / "zz_bad.json").write_text(make(clips[2][1]))
    with _only_output_changes(tmp_path, tmp_path / "out"):
        summary = write_shards(videos, tmp_path / "out", progress=False)["all"]
    assert summary.written == 2
    ((name, why),) = summary.skipped
    assert name == "zz_bad.mp4" and reason in why, why
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["schema"]["state"]["width"] == 8 and index["schema"]["action"]["width"] == 4
    assert index["schema"]["labels"]["names"] == ["digit0", "digit1"] and index["schema"]["state"]["samples"] == 2
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:  # standard JSON only: no NaN / Infinity token
        for member in tar.getmembers():
            if member.name.endswith(".json"):
                text = tar.extractfile(member).read().decode()
                assert "NaN" not in text and "Infinity" not in text, member.name


def test_an_oversized_sidecar_is_refused_before_it_is_read(clips, tmp_path):
    videos = video_folder(tmp_path / "videos", clips, ["a"])
    (videos / "big.mp4").write_bytes(clips[1][0])
    with (videos / "big.json").open("wb") as handle:  # sparse: the size the stat reports, no bytes on disk
        handle.truncate(MAX_SIDECAR_BYTES + 1)
    summary = write_shards(videos, tmp_path / "out", progress=False)["all"]
    assert summary.written == 1 and "over the input size cap" in dict(summary.skipped)["big.mp4"]


def test_string_labels_need_a_declared_categorical_mapping(clips, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for i, activity in enumerate(["walking", "running", "flying"]):
        sidecar = {**clips[i][1], "labels": {"activity": activity}}
        (videos / f"v{i}.mp4").write_bytes(clips[i][0])
        (videos / f"v{i}.json").write_text(json.dumps(sidecar))
    refused = write_shards(videos, tmp_path / "plain", progress=False)["all"]
    assert refused.written == 0 and all("--label-map FILE" in why for _, why in refused.skipped)

    label_map = tmp_path / "labels.json"
    label_map.write_text(json.dumps({"activity": ["walking", "running"]}))
    assert main(["--input", str(videos), "--output", str(tmp_path / "mapped"), "--label-map", str(label_map),
                 "--no-progress"]) == 0  # fmt: skip
    index = json.loads((tmp_path / "mapped" / "index.json").read_text())
    assert index["schema"]["labels"]["categories"] == {"activity": ["walking", "running"]}
    assert index["total_samples"] == 2  # "flying" is not a declared category: skipped
    cfg = DataConfig(num_context=2, num_target=2, batch_size=2, num_workers=0, shuffle_buffer=2, decoder="pyav")
    (batch,) = make_eval_loader(cfg, str(tmp_path / "mapped" / "shard-*.tar"), num_clips=2)
    assert batch["label_names"] == ["activity"] and batch["labels"][:, 0].tolist() == [0, 1]  # v0 walking, v1 running
    bad_map = tmp_path / "bad_map.json"
    bad_map.write_text('{"activity": "walking"}')
    with pytest.raises(ValueError, match="needs a non-empty list of category strings"):
        write_shards(videos, tmp_path / "never", label_map=bad_map)


# ---- a write that survives its inputs ----------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "data_pipeline.writer", "--no-progress", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("reencode", [[], ["--size", "32"]], ids=["copy", "reencode"])
def test_devices_and_fifos_are_skipped_not_read(clips, tmp_path, reencode):
    """/dev/zero behind a video name would be read until memory runs out, a FIFO would hang the writer: both are
    refused from os.stat before anything opens them, as a video and as a sidecar."""
    videos = video_folder(tmp_path / "videos", clips, ["a", "b"])
    (videos / "zero.mp4").symlink_to("/dev/zero")
    os.mkfifo(videos / "pipe.mp4")
    (videos / "b.json").unlink()
    os.mkfifo(videos / "b.json")
    with _only_output_changes(tmp_path, tmp_path / "out"):
        result = _cli("--input", str(videos), "--output", str(tmp_path / "out"), *reencode)
    assert result.returncode == 0, result.stderr
    assert "wrote 1 samples in 1 shards, skipped 3" in result.stdout
    assert "skipped zero.mp4: OSError:" in result.stdout and "(it is a character device)" in result.stdout
    assert "skipped pipe.mp4: OSError:" in result.stdout and "(it is a FIFO)" in result.stdout
    assert "skipped b.mp4: MetadataError: sidecar b.json cannot be read" in result.stdout


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request, client_address) -> None:  # a client that stops reading is expected here
        pass


class _Hostile(http.server.BaseHTTPRequestHandler):
    """/KIND/NAME.mp4: the video of the server, served the KIND way (see `test_network_inputs_...`)."""

    def log_message(self, *args) -> None:
        pass

    def _send(self, body: bytes, cut: int | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:cut] if cut is not None else body)

    def _redirect(self, where: str) -> None:
        self.send_response(302)
        self.send_header("Location", where)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        hits = self.server.hits
        hits[self.path] += 1
        kind = self.path.split("/")[1]
        body = self.server.body
        if kind == "ok":
            self._send(body)
        elif kind == "flaky":  # fewer bytes than announced once, then the whole video
            self._send(body, cut=len(body) // 2 if hits[self.path] == 1 else None)
        elif kind == "busy":  # HTTP 503 once
            self.send_error(503) if hits[self.path] == 1 else self._send(body)
        elif kind == "short":  # always fewer bytes than announced
            self._send(body, cut=100)
        elif kind == "missing":
            self.send_error(404)
        elif kind == "to-ftp":
            self._redirect("ftp://127.0.0.1/video.mp4")
        elif kind == "to-file":
            self._redirect("file:///etc/hostname")
        elif kind == "to-ok":
            self._redirect("/ok/" + self.path.rsplit("/", 1)[-1])
        elif kind == "huge":  # announces a terabyte
            self.send_response(200)
            self.send_header("Content-Length", str(10**12))
            self.end_headers()
        elif kind == "endless":  # no Content-Length, bytes until the client stops reading
            self.send_response(200)
            self.end_headers()
            for _ in range(200):
                self.wfile.write(bytes(65536))
        elif kind == "slow":  # a trickle: every read answers in time, the whole never does
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for i in range(0, len(body), 200):
                self.wfile.write(body[i : i + 200])
                self.wfile.flush()
                time.sleep(0.25)


@contextlib.contextmanager
def _hostile_server(body: bytes):
    server = _Server(("127.0.0.1", 0), _Hostile)
    server.body, server.hits = body, Counter()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_network_inputs_retry_cap_time_out_and_recheck_redirects(clips, tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "FETCH_BACKOFF_S", 0.05)  # the retry schedule, shortened for the test
    with _hostile_server(clips[0][0]) as (server, url):
        names = {
            "ok": "ok/a.mp4", "flaky": "flaky/b.mp4", "busy": "busy/c.mp4", "to-ok": "to-ok/d.mp4",
            "short": "short/e.mp4", "missing": "missing/f.mp4", "to-ftp": "to-ftp/g.mp4",
            "to-file": "to-file/h.mp4", "huge": "huge/i.mp4", "endless": "endless/j.mp4", "slow": "slow/k.mp4",
        }  # fmt: skip
        listed = tmp_path / "list.txt"
        lines = [f"{url}/{path}" for path in names.values()] + [f"{url}/ok/with space.mp4"]
        listed.write_text("\n".join(lines) + "\n")
        with _only_output_changes(tmp_path, tmp_path / "out"):
            summary = write_shards(
                listed, tmp_path / "out", max_input_bytes=200_000, fetch_deadline_s=1.5, progress=False
            )["all"]
        hits = dict(server.hits)
    assert _members(tmp_path / "out") == ["c.mp4", "c.json", "b.mp4", "b.json", "a.mp4", "a.json", "d.mp4", "d.json"]
    skipped = {name.split("/", 3)[-1]: why for name, why in summary.skipped}
    assert "the server sent 100 of" in skipped["short/e.mp4"] and "in 3 tries" in skipped["short/e.mp4"]
    assert "HTTP 404" in skipped["missing/f.mp4"]
    assert "redirects (HTTP 302) to 'ftp://127.0.0.1/video.mp4'" in skipped["to-ftp/g.mp4"]
    assert "file:///etc/hostname" in skipped["to-file/h.mp4"] and "not allowed" in skipped["to-file/h.mp4"]
    assert "is 1000000000000 bytes, over the input size cap of 200000" in skipped["huge/i.mp4"]
    assert "sent more than the input size cap" in skipped["endless/j.mp4"]
    assert "deadline of 1.5 s (--fetch-deadline)" in skipped["slow/k.mp4"]
    assert "holds a space; percent-encode it" in skipped["ok/with space.mp4"]
    assert hits["/flaky/b.mp4"] == 2 and hits["/busy/c.mp4"] == 2 and hits["/short/e.mp4"] == 3
    assert hits["/missing/f.mp4"] == 1  # a 404 will not change: no retry
    assert "/ok/with space.mp4" not in hits and not any("ftp" in path for path in hits if path != "/to-ftp/g.mp4")


def test_unicode_names_keep_their_keys_and_shell_characters_do_not(clips, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    names = ["Привет мир", "日本語の動画", "café", "cafe\u0301", "$(touch pwned)", "a;b|c", "naïve.v2"]
    for name, (video, sidecar) in zip(names, clips + clips, strict=False):
        (videos / f"{name}.mp4").write_bytes(video)
        (videos / f"{name}.json").write_text(json.dumps(sidecar))
    bad_utf8 = os.fsencode(videos) + b"/bad\xff.mp4"  # a name that is not UTF-8 at all
    with open(bad_utf8, "wb") as handle:
        handle.write(clips[0][0])
    with _only_output_changes(tmp_path, tmp_path / "out"):
        result = _cli("--input", str(videos), "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "wrote 7 samples" in result.stdout and "skipped 1" in result.stdout
    assert "skipped café.mp4: duplicate key 'café'" in result.stdout  # NFD (sorted first) and NFC: one key
    keys = sorted(name.rsplit(".", 1)[0] for name in _members(tmp_path / "out"))
    assert keys == sorted(2 * ["Привет_мир", "日本語の動画", "café", "__touch_pwned_", "a_b_c", "naïve_v2", "bad_"])
    assert not (REPO / "pwned").exists() and not (videos / "pwned").exists()
    cfg = DataConfig(num_context=2, num_target=2, batch_size=7, num_workers=0, shuffle_buffer=2, decoder="pyav")
    (batch,) = make_eval_loader(cfg, str(tmp_path / "out" / "shard-*.tar"), num_clips=7)
    assert "日本語の動画" in batch["key"] and "Привет_мир" in batch["key"] and batch["skipped"] == {}

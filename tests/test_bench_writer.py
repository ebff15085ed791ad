"""The writer benchmark runs end to end on small videos and prints every field."""

from __future__ import annotations

import json

from benchmarks.writer import main


def test_bench_writer_prints_writer_and_decode_figures(tmp_path, capsys):
    args = ["--videos", str(tmp_path / "videos"), "--sizes", "160x90", "--codecs", "h264", "mpeg4", "--size", "32"]
    assert main(args) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    writer = [r for r in records if r["kind"] == "writer"]
    assert [(r["mode"], r["workers"]) for r in writer] == [("copy", 1), ("copy", 2), ("reencode", 1), ("reencode", 2)]
    assert all(r["videos"] == 6 and r["frames"] == 2 * (132 + 250 + 120) and r["videos_s"] > 0 for r in writer)
    assert [r["mode"] for r in records if r["kind"] == "writer_speedup"] == ["copy", "reencode"]
    assert [r["workers"] for r in records if r["kind"] == "machine_speedup" and r["speedup"] > 0] == [2]
    decode = {(r["codec"], r["method"]): r for r in records if r["kind"] == "decode"}
    methods = {"full_then_resize", "one_swscale", "decord", "decord_reduced"}
    assert {m for c, m in decode if c == "h264"} == methods  # H.264 has no lowres decoding
    assert {m for c, m in decode if c == "mpeg4"} == methods | {"lowres"}
    assert all(r["frames"] == 502 and r["ms_per_frame"] > 0 for r in decode.values())
    assert json.loads((tmp_path / "videos" / "manifest.json").read_text())[0]["file"] == "bigbuckbunny_160x90_h264.mp4"

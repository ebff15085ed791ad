"""The writer's resume and merge of --num-jobs runs verify content, and no run deletes another run's output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hostile_helpers import video_folder
from shard_helpers import tree_state

from data_pipeline.shardlist import check_folders
from data_pipeline.writer import OutputInUse, merge_jobs, write_shards
from data_pipeline.writer.cli import main
from data_pipeline.writer.jobs import record_digest

# ---- resume and merge that verify content ------------------------------------------------------------------------


@pytest.fixture
def six(clips, tmp_path) -> Path:
    return video_folder(tmp_path / "videos", clips, [f"clip{i}" for i in range(6)])


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


JOB = {"samples_per_shard": 2, "progress": False, "num_jobs": 2}


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        ({"seed": 1}, {"seed": 2}, r"job 1 was written with another --seed 2 \(job 0: 1\)"),
        ({"val_fraction": 0.3}, {"val_fraction": 0.5}, r"another --val-fraction 0.5 \(job 0: 0.3\)"),
        ({}, {"samples_per_shard": 3}, r"another options \(shard size"),
    ],
    ids=["seed", "val_fraction", "options"],
)
def test_merge_refuses_jobs_of_different_runs(six, tmp_path, first, second, message):
    base = {**JOB, "val_fraction": 0.3, "seed": 0}
    write_shards(six, tmp_path / "out", **{**base, **first}, job_index=0)
    write_shards(six, tmp_path / "out", **{**base, **second}, job_index=1)
    before = tree_state(tmp_path)
    with pytest.raises(RuntimeError, match=message + r".*rerun job 1 \(or every job\)"):
        merge_jobs(tmp_path / "out")
    assert tree_state(tmp_path) == before  # a refused merge moves nothing


def test_merge_refuses_jobs_over_a_changed_input_list(six, clips, tmp_path):
    write_shards(six, tmp_path / "out", **JOB, job_index=0)
    (six / "clip2_extra.mp4").write_bytes(clips[0][0])  # a video added between the two array tasks
    write_shards(six, tmp_path / "out", **JOB, job_index=1)
    with pytest.raises(RuntimeError, match=r"job 1 was written with another input list \(a video or sidecar added"):
        merge_jobs(tmp_path / "out")


def test_a_changed_sidecar_is_seen_on_rerun(six, tmp_path, capsys):
    first = write_shards(six, tmp_path / "out", **JOB, job_index=1)["all"]
    (six / "clip4.json").write_text((six / "clip4.json").read_text().replace('"digit0": ', '"digit0": 1'))
    again = write_shards(six, tmp_path / "out", **JOB, job_index=1)["all"]
    assert "is from another run: other input list" in capsys.readouterr().err
    assert again.kept == 0 and again.written == first.written  # written again, not kept as it was


def test_a_flipped_byte_in_a_kept_shard_is_rewritten(six, tmp_path):
    write_shards(six, tmp_path / "out", **JOB, job_index=1)
    before = _files(tmp_path / "out")
    shard = tmp_path / "out" / "shard-j00001-000000.tar"
    data = bytearray(shard.read_bytes())
    data[1500] ^= 0xFF  # same size, same member names: only the content differs
    shard.write_bytes(bytes(data))
    again = write_shards(six, tmp_path / "out", **JOB, job_index=1)["all"]
    assert again.kept == 0 and _files(tmp_path / "out") == before


def test_merge_refuses_a_shard_whose_content_changed_and_the_rerun_repairs_it(six, tmp_path):
    for index in (0, 1):
        write_shards(six, tmp_path / "out", **JOB, job_index=index)
    shard = tmp_path / "out" / "shard-j00000-000001.tar"
    data = bytearray(shard.read_bytes())
    data[-2000] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=r"shard-j00000-000001.tar of job 0 .* sha256.*rerun job 0"):
        merge_jobs(tmp_path / "out")
    write_shards(six, tmp_path / "out", **JOB, job_index=0)
    merged = merge_jobs(tmp_path / "out")["all"]
    assert merged.written == 6 and json.loads((tmp_path / "out" / "index.json").read_text())["num_jobs"] == 2


def test_an_edited_job_file_is_not_trusted(six, tmp_path, capsys):
    for index in (0, 1):
        write_shards(six, tmp_path / "out", **JOB, job_index=index)
    job_file = tmp_path / "out" / "job-00001-of-00002.json"
    record = json.loads(job_file.read_text())
    record["shards"][0]["next"] = [3, 0]  # a careless edit: resume would skip an input
    job_file.write_text(json.dumps(record))
    with pytest.raises(RuntimeError, match=r"job-00001-of-00002.json \(job 1\) was edited or damaged.*rerun job 1"):
        merge_jobs(tmp_path / "out")
    again = write_shards(six, tmp_path / "out", **JOB, job_index=1)["all"]
    assert "was edited or damaged" in capsys.readouterr().err and again.kept == 0 and again.written == 3

    record = json.loads(job_file.read_text())  # a consistent-looking edit (digest recomputed): a shard dropped
    record["shards"].pop()
    record["digest"] = record_digest(record)
    job_file.write_text(json.dumps(record))
    with pytest.raises(RuntimeError, match=r"job 1: its shards hold 2 inputs and it skipped 0, but .* has 3"):
        merge_jobs(tmp_path / "out")


# ---- no deletion of another run's output -------------------------------------------------------------------------


def test_a_single_run_refuses_the_folder_of_an_unmerged_array(six, tmp_path, capsys):
    write_shards(six, tmp_path / "out", **JOB, job_index=1)
    before = tree_state(tmp_path)
    assert main(["--input", str(six), "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "holds the job files of an unmerged 2-job run" in error and "merge that run first" in error
    with pytest.raises(OutputInUse, match="unmerged 2-job run"):  # nor another array
        write_shards(six, tmp_path / "out", samples_per_shard=2, progress=False, num_jobs=3, job_index=0)
    assert tree_state(tmp_path) == before


def test_after_a_merge_no_rerun_deletes_index_json(six, tmp_path):
    for index in (0, 1):
        write_shards(six, tmp_path / "out", **JOB, job_index=index)
    merge_jobs(tmp_path / "out")
    before = tree_state(tmp_path)
    with pytest.raises(OutputInUse, match=r"holds a finished dataset \(index.json, written by a 2-job run\)"):
        write_shards(six, tmp_path / "out", **JOB, job_index=1)
    with pytest.raises(OutputInUse, match="holds the merged output of a 2-job run"):
        write_shards(six, tmp_path / "out", samples_per_shard=2, progress=False)
    assert tree_state(tmp_path) == before
    single = write_shards(six, tmp_path / "single", samples_per_shard=2, progress=False)["all"]
    assert write_shards(six, tmp_path / "single", samples_per_shard=3, progress=False)["all"].written == single.written


def test_the_loader_warns_about_unfinished_or_mixed_folders(six, tmp_path):
    write_shards(six, tmp_path / "array", **JOB, job_index=0)
    with pytest.warns(UserWarning, match="holds job files of an unmerged --num-jobs run"):
        check_folders([str(p) for p in (tmp_path / "array").glob("shard-*.tar")])
    write_shards(six, tmp_path / "single", samples_per_shard=2, progress=False)
    stray = tmp_path / "single" / "shard-j00000-000000.tar"
    stray.write_bytes((tmp_path / "array" / "shard-j00000-000000.tar").read_bytes())
    with pytest.warns(UserWarning, match=r"1 shard\(s\) matched in .* are not in its index.json"):
        check_folders([str(p) for p in (tmp_path / "single").glob("shard-*.tar")])
    (tmp_path / "single" / "index.json").unlink()
    with pytest.warns(UserWarning, match="has no index.json: it is being written, was interrupted"):
        check_folders([str(tmp_path / "single" / "shard-000000.tar")])

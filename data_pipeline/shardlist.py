"""Shard lists: expand a shard spec into URLs, check them at start-up, and give each reader slot its share.

A spec is one or more of, separated by spaces (or by `::`, webdataset's separator, which a `pipe:` command needs
because the command itself contains spaces):

    data/train/shard-*.tar                     local glob
    data/train/shard-{000000..000009}.tar      brace pattern (local, or inside a URL or command)
    https://host/train/shard-{000..009}.tar    http(s) URL (read with curl by webdataset)
    pipe:aws s3 cp s3://bucket/shard-000000.tar -     a command whose stdout is a tar (a spec that starts with
                                                      `pipe:` and has no `::` is one command)

The program of each `pipe:` command (its first word, after `NAME=value` assignments and `env`/`exec`), and curl
for http(s) URLs, must be on PATH of the machine that runs the loader: `expand_shards` checks that at start-up, so a
missing program is one clear error instead of every shard being skipped as a `shard_error`.

It also warns (`check_folders`) about a local shard folder that may not be a finished dataset: one without
index.json (being written, interrupted, or not made by data_pipeline.writer), one holding the job files of an
unmerged `--num-jobs` run, and shards matched there that its index.json does not list (left by another run).

A reader slot is one DataLoader worker of one rank: slot = rank * num_workers + worker, slots = world_size *
num_workers. Every epoch the shard list is shuffled with (seed, epoch), identically on every rank. With at least as
many shards as slots, slot k reads shuffled[k::slots] (disjoint shares). With fewer, every slot reads every shard
and keeps the samples whose running index i has i % slots == k (`modulo` mode).
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import braceexpand
import numpy as np

from data_pipeline.clips import MetadataError
from data_pipeline.format import INDEX_NAME, JOB_GLOB
from data_pipeline.sidecar import INDEX_MAX_BYTES, load_json

URL_SCHEMES = ("http://", "https://")


class ShardListError(ValueError):
    """The shard spec names nothing, names shards that do not exist, or needs a program that is not installed."""


def _split_spec(spec: str) -> list[str]:
    if "::" in spec:
        return [part.strip() for part in spec.split("::") if part.strip()]
    if spec.strip().startswith("pipe:"):
        return [spec.strip()]
    return spec.split()


def _expand_local(pattern: str) -> list[str]:
    path = pattern.removeprefix("file:")
    if glob.has_magic(path):
        found = sorted(glob.glob(path))
        if not found:
            raise ShardListError(f"shard glob {pattern!r} matches no files (cwd {os.getcwd()})")
        return found
    if not os.path.isfile(path):
        raise ShardListError(f"shard {pattern!r} does not exist (cwd {os.getcwd()}); check the data.*_shards path")
    return [path]


# Shell syntax and builtins: a command that starts with one of them is run by /bin/sh itself (webdataset runs a
# `pipe:` command with shell=True), so there is no program to look up.
_SHELL_WORDS = frozenset(
    {"!", "(", "{", "[", "[[", ".", ":", "cd", "case", "command", "echo", "eval", "export", "for", "if", "printf"}
    | {"read", "set", "source", "test", "true", "until", "while"}
)
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
_FIX = (
    "install it on every machine that runs the loader, or give its absolute path; in the Docker image, build with "
    "--build-arg WITH_S5CMD=1 for s5cmd or add the tool in an image on top (docker/README.md, 'Shards on a shared "
    "filesystem or in object storage')"
)


def pipe_program(url: str) -> str | None:
    """The program a `pipe:` shard URL runs (`pipe:FOO=1 env -i s5cmd cat s3://...` -> `s5cmd`), with `~` and
    `$VAR` expanded as the shell would; None when the command starts with shell syntax or a shell builtin (nothing
    to look up) or cannot be parsed (then the shell reports it when the shard is opened). Only the words up to the
    program are read."""
    lexer = shlex.shlex(url.removeprefix("pipe:"), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = iter(lexer)
    try:
        word = next(words, None)
        while word is not None and _ASSIGNMENT.match(word):
            word = next(words, None)
        if word == "exec":
            word = next(words, None)
        if word == "env":  # env [-i] [-u NAME] [NAME=value ...] PROGRAM ...
            word = next(words, None)
            while word is not None and (word.startswith("-") or _ASSIGNMENT.match(word)):
                if word in ("-u", "--unset", "-C", "--chdir"):
                    next(words, None)
                word = next(words, None)
    except ValueError:  # unbalanced quotes
        return None
    if not word or word in _SHELL_WORDS or word[0] in "&|;<>()":
        return None
    program = os.path.expandvars(os.path.expanduser(word))
    return None if any(c in program for c in "$`*?") else program


def check_programs(urls: list[str]) -> None:
    """Fail with a ShardListError naming the program and the fix when the program of a `pipe:` command, or curl
    (which reads http(s) URLs), is not installed on this machine."""
    found: dict[str, bool] = {}
    for url in urls:
        if url.startswith(URL_SCHEMES):
            program, role = "curl", "reads http(s) shard URLs"
        elif url.startswith("pipe:"):
            program, role = pipe_program(url), f"runs the shard command {url!r}"
        else:
            continue
        if program is None:
            continue
        if program not in found:
            found[program] = shutil.which(program) is not None
        if not found[program]:
            where = "does not exist or is not executable" if os.sep in program else "is not on PATH"
            raise ShardListError(
                f"{program!r}, which {role}, {where} on this machine (PATH={os.environ.get('PATH', '')}): {_FIX}"
            )


def _check_url(url: str, timeout: float = 10.0) -> None:
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return
    except urllib.error.HTTPError as exc:
        if exc.code == 405:  # the server does not answer HEAD; the reader will find out
            return
        raise ShardListError(f"shard URL {url!r} answered HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise ShardListError(f"shard URL {url!r} cannot be reached: {exc}") from exc


def _listed_shards(index: str) -> set[str] | None:
    """The shard names an index.json lists (None if it cannot be read as one)."""
    try:
        with open(index, "rb") as handle:
            data = load_json(handle.read(INDEX_MAX_BYTES + 1), index, max_bytes=INDEX_MAX_BYTES)
        return {str(shard["name"]) for shard in data["shards"]}
    except (OSError, MetadataError, KeyError, TypeError):
        return None


def check_folders(paths: list[str]) -> list[str]:
    """Warn (UserWarning) about each folder of local shards `paths` that may not be a finished dataset: no
    index.json, job files of an unmerged --num-jobs run (job-*-of-*.json), or shards its index.json does not list.
    Returns the warnings."""
    by_folder: dict[str, list[str]] = {}
    for path in paths:
        path = path.removeprefix("file:")
        by_folder.setdefault(os.path.dirname(os.path.abspath(path)), []).append(os.path.basename(path))
    found = []
    for folder, names in by_folder.items():
        jobs = sorted(glob.glob(os.path.join(glob.escape(folder), JOB_GLOB)))
        if jobs:
            found.append(
                f"{folder} holds job files of an unmerged --num-jobs run ({os.path.basename(jobs[0])}, ...): its "
                "shards are not a finished dataset (jobs may be missing or unfinished); merge it first: python -m "
                "data_pipeline.writer --merge FOLDER (the folder above train/ and val/)"
            )
        index = os.path.join(folder, INDEX_NAME)
        listed = _listed_shards(index) if os.path.exists(index) else None
        if listed is None:
            if not jobs:
                state = "an unreadable index.json" if os.path.exists(index) else "no index.json"
                found.append(
                    f"{folder} has {state}: it is being written, was interrupted, or was not made by "
                    "data_pipeline.writer; its shards are read as they are (and the first usable sample of "
                    "each reader fixes the sidecar widths)"
                )
            continue
        extra = sorted(set(names) - listed)
        if extra:
            found.append(
                f"{len(extra)} shard(s) matched in {folder} are not in its index.json (e.g. {extra[0]}): left by "
                "another run? Their samples may be there twice; list only the shards index.json names"
            )
    for message in found:
        warnings.warn(message, stacklevel=3)
    return found


def expand_shards(spec: str, *, check_urls: bool = True) -> list[str]:
    """Expand a shard spec into a list of shard URLs/paths, failing at start-up with a clear error when it is empty,
    a local shard or glob matches nothing, the program of a `pipe:` command (or curl for http(s)) is not installed
    here, or (with `check_urls`) the first http(s) URL does not answer. Warns about local folders that may not be a
    finished dataset (`check_folders`)."""
    if not spec or not spec.strip():
        raise ShardListError("the shard list is empty; set data.train_shards / data.val_shards to a glob or URL")
    urls: list[str] = []
    for part in _split_spec(spec):
        for item in braceexpand.braceexpand(part):
            if item.startswith("pipe:") or item.startswith(URL_SCHEMES):
                urls.append(item)
            else:
                urls.extend(_expand_local(item))
    check_programs(urls)
    check_folders([u for u in urls if not (u.startswith("pipe:") or u.startswith(URL_SCHEMES))])
    remote = [u for u in urls if u.startswith(URL_SCHEMES)]
    if check_urls and remote:
        _check_url(remote[0])
    return urls


@dataclass(frozen=True)
class Slot:
    """Reader slot `index` of `count` (count = world_size * num_workers)."""

    index: int
    count: int


def epoch_order(urls: list[str], seed: int, epoch: int) -> list[str]:
    """The shard list shuffled with (seed, epoch): the same on every rank."""
    order = np.random.default_rng([seed, epoch]).permutation(len(urls))
    return [urls[i] for i in order]


def uses_modulo(num_shards: int, slot: Slot) -> bool:
    """True when there are fewer shards than slots, so every slot reads all shards and keeps every slots-th sample."""
    return num_shards < slot.count


def slot_passes(urls: list[str], seed: int, epoch: int, slot: Slot) -> Iterator[list[str]]:
    """Endless passes over this slot's shards: pass p is the slot's share in an order seeded by (seed, epoch, p).

    In modulo mode all slots read all shards in the same order per pass (so their sample indices line up);
    otherwise each slot has a disjoint share, reshuffled per pass with (seed, epoch, slot, p).
    """
    ordered = epoch_order(urls, seed, epoch)
    modulo = uses_modulo(len(urls), slot)
    share = ordered if modulo else ordered[slot.index :: slot.count]
    p = 0
    while True:
        key = [seed, epoch, p] if modulo else [seed, epoch, slot.index, p]
        order = np.random.default_rng(key).permutation(len(share)) if p > 0 else np.arange(len(share))
        yield [share[i] for i in order]
        p += 1

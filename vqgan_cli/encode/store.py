"""The output folder of encode-dataset: manifest, crash-safe shard commits and resume.

Commit protocol for shard ``s`` (each step survives kill -9 at any moment):

1. samples stream into ``.shard-s.tar.partial`` (never mistaken for a shard: other name);
2. the partial is fsynced and hashed; the manifest (written atomically) records its entry;
3. the partial is renamed to ``shard-s.tar``.

On restart a recorded shard whose file is missing but whose partial matches the recorded
sha256 is renamed into place (the crash fell between 2 and 3); every other partial is deleted
and its shard encoded again. A recorded shard whose file no longer matches its sha256 (changed
after encoding) is deleted and encoded again; shards that match are never rewritten.

Under torchrun only rank 0 writes ``manifest.json``; during the encode loop each rank records
step 2 in its own ``.progress-rank-NNNNN.json`` (same entries, written atomically), which rank 0
folds into the manifest at the end, or at the start of the next run after a kill (``ranks``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from vqgan_cli.checkpoints.format import atomic_write, file_sha256
from vqgan_cli.encode.inputs import EncodeUsageError
from vqgan_cli.faults import human_bytes, ledger, space_shortfall
from vqgan_cli.shards.format import (
    MANIFEST,
    RANK_RECORD_RE,
    SHARD_RE,
    ShardError,
    ShardWriter,
    load_manifest,
    rank_record_name,
    shard_name,
)

PARTIAL_RE = re.compile(r"^\.shard-(\d{6})\.tar\.partial$")
# atomic_write temps (of the manifest and of rank records), probes
LEFTOVER_RE = re.compile(r"^\.(manifest\.json\..*\.tmp|progress-rank-\d+\.json\..*\.tmp|write-probe\..*)$")


def partial_name(index: int) -> str:
    return f".{shard_name(index)}.partial"


def check_writable(out: Path) -> None:
    """Fail before any work when the output folder cannot be created or written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise EncodeUsageError(f"{out}: output folder is not writable ({e.strerror or e}); "
                               "choose another `out`") from None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class OutputFolder:
    """One shard folder and its manifest; all writes go through here."""

    def __init__(self, out: Path, manifest: dict, rank: int | None = None):
        self.out = out
        self.manifest = manifest
        self.space_checked = False
        self.rank = rank  # set under torchrun: commits go to this rank's record, not the manifest
        self.committed: list[dict] = []  # this process's entries (the rank record's content)

    @property
    def done(self) -> set[int]:
        return {int(e["index"]) for e in self.manifest["shards"]}

    def bytes_per_item(self) -> float | None:
        """Shard bytes per input item so far (None before the first shard): the space estimate."""
        entries = self.manifest["shards"]
        items = sum(e["items"][1] - e["items"][0] for e in entries)
        return sum(e["bytes"] for e in entries) / items if items else None

    def space_warning(self, items_left: int) -> str | None:
        """Once a shard exists: a warning when the disk has less room than the rest will take."""
        per = self.bytes_per_item()
        if per is None or items_left <= 0:
            return None
        self.space_checked = True
        return space_shortfall(self.out, round(per * items_left), f"{items_left} more input(s) at "
                               f"{human_bytes(per)} each, as in the shards written so far", "`out`")

    def save(self) -> None:
        entries = sorted(self.manifest["shards"], key=lambda e: e["index"])
        self.manifest["shards"] = entries
        self.manifest["skipped"] = [s for e in entries for s in e["skipped"]]
        self.manifest["counts"] = {"samples": sum(e["count"] for e in entries),
                                   "skipped": len(self.manifest["skipped"]),
                                   "shards_done": len(entries)}
        text = json.dumps(self.manifest, indent=1) + "\n"

        def write(p: Path) -> None:
            p.write_text(text)
            p.chmod(0o644)  # mkstemp's 0600 would hide the manifest from other readers

        atomic_write(self.out / MANIFEST, write)
        n = len(entries)
        if (per := self.bytes_per_item()) is not None:  # what the rest will take, for a full-disk message
            ledger.need = round(per * (self.manifest["n_items"] - sum(e["items"][1] - e["items"][0] for e in entries)))
        ledger.record(f"{n} of {self.manifest['n_shards']} shard(s) and {MANIFEST} in {self.out} are intact"
                      if n else f"no shard is finished yet in {self.out}",
                      "re-run the same command: it resumes at the first missing shard")

    def save_rank_record(self) -> None:
        """Step 2 under torchrun: this rank's committed entries, replaced atomically."""
        text = json.dumps({"rank": self.rank, "shards": self.committed}, indent=1) + "\n"
        atomic_write(self.out / rank_record_name(self.rank or 0), lambda p: p.write_text(text))
        ledger.record(f"{len(self.committed)} shard(s) this rank finished, recorded in "
                      f"{self.out / rank_record_name(self.rank or 0)}, are intact",
                      "re-run the same command: it merges the ranks' records and encodes the missing shards")

    def writer(self, index: int) -> ShardWriter:
        return ShardWriter(self.out / partial_name(index))

    def commit(self, index: int, writer: ShardWriter, items: tuple[int, int], skipped: list[dict]) -> dict:
        """Steps 2 and 3 of the protocol; returns the manifest entry."""
        sha = writer.close()
        partial = self.out / partial_name(index)
        entry = {"index": index, "name": shard_name(index), "count": writer.count, "sha256": sha,
                 "bytes": partial.stat().st_size, "items": list(items), "skipped": skipped}
        self.manifest["shards"] = [e for e in self.manifest["shards"] if e["index"] != index] + [entry]
        self.committed.append(entry)
        if self.rank is None:
            self.save()
        else:
            self.save_rank_record()
        os.replace(partial, self.out / shard_name(index))
        _fsync_dir(self.out)
        return entry

    def recover(self) -> list[str]:
        """Finish interrupted commits, drop partials and unrecorded shards; returns notes."""
        notes = []
        kept = []
        for e in self.manifest["shards"]:
            final, partial = self.out / e["name"], self.out / partial_name(e["index"])
            if final.is_file():
                if final.stat().st_size != e["bytes"] or file_sha256(final) != e["sha256"]:
                    notes.append(f"{e['name']} differs from the sha256 in {MANIFEST} (changed after "
                                 "encoding): encoding it again")
                    continue  # unrecorded now: deleted below
                kept.append(e)
            elif partial.is_file() and file_sha256(partial) == e["sha256"]:
                os.replace(partial, final)
                kept.append(e)
                notes.append(f"completed the interrupted commit of {e['name']}")
            else:
                notes.append(f"{e['name']} is missing: encoding it again")
        if len(kept) < len(self.manifest["shards"]):
            self.manifest["complete"] = False
        self.manifest["shards"] = kept
        recorded = {e["name"] for e in kept}
        for p in self.out.iterdir():
            if PARTIAL_RE.match(p.name) or LEFTOVER_RE.match(p.name) \
                    or (SHARD_RE.match(p.name) and p.name not in recorded):
                p.unlink()
        self.save()
        drop_rank_records(self.out)  # after the save: their entries are in the manifest now
        _fsync_dir(self.out)
        return notes


def merge_rank_records(out: Path, manifest: dict) -> list[str]:
    """Fold the entries that torchrun ranks recorded into ``manifest`` (at the end of a launch,
    or at the start of the run after a killed one); returns notes on unreadable records."""
    notes, entries = [], {}
    for p in sorted(out.iterdir()):
        if not RANK_RECORD_RE.match(p.name):
            continue
        try:
            entries.update({int(e["index"]): e for e in json.loads(p.read_text())["shards"]})
        except (OSError, ValueError, KeyError, TypeError) as e:
            notes.append(f"{p.name} is unreadable ({e}): the shards it recorded are encoded again")
    manifest["shards"] = [e for e in manifest["shards"] if int(e["index"]) not in entries] + list(entries.values())
    return notes


def drop_rank_records(out: Path) -> None:
    """Delete the rank records once the manifest holds their entries."""
    for p in out.iterdir():
        if RANK_RECORD_RE.match(p.name):
            p.unlink(missing_ok=True)


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: manifest has {a!r}, this command {b!r}")
    return out


def clear(out: Path) -> None:
    """--overwrite: remove what encode-dataset wrote (manifest, shards, partials) and nothing else."""
    if not out.is_dir():
        return
    (out / MANIFEST).unlink(missing_ok=True)  # first: a half-cleared folder is never resumed
    for p in out.iterdir():
        if p.name == MANIFEST or any(rx.match(p.name)
                                     for rx in (SHARD_RE, PARTIAL_RE, LEFTOVER_RE, RANK_RECORD_RE)):
            p.unlink() if p.is_file() else shutil.rmtree(p)


def open_output(out: Path, manifest: dict, overwrite: bool) -> tuple[OutputFolder, list[str]]:
    """Start a new folder, or resume one whose manifest records the same identity (tokenizers
    and every setting that changes shard contents); a different one is refused."""
    check_writable(out)
    if overwrite:
        clear(out)
    path = out / MANIFEST
    if path.is_file():
        try:
            old = load_manifest(out)
        except ShardError as e:
            raise EncodeUsageError(f"{e}; choose another `out`, or `overwrite` to start over") from None
        diffs = _differences(old.get("identity", {}), manifest["identity"])
        if any(d.startswith(("tokenizer_sha256", "cond_tokenizer_sha256")) for d in diffs):
            was = (old.get("tokenizer") or {}).get("path")
            raise EncodeUsageError(
                f"{out} holds tokens of a different tokenizer (made with {was}; weights differ from "
                f"{manifest['tokenizer']['path']}); tokens of two tokenizers cannot share a folder: "
                "use another `out`, or `overwrite` to start over")
        if diffs:
            raise EncodeUsageError(
                f"{out} holds shards made with a different tokenizer or settings:\n  - "
                + "\n  - ".join(diffs) + "\nuse another `out`, or `overwrite` to start over")
        old["command"], old["run"] = manifest["command"], manifest["run"]
        notes = merge_rank_records(out, old)
        folder = OutputFolder(out, old)
        return folder, notes + folder.recover()
    strays = sorted(p.name for p in out.iterdir() if SHARD_RE.match(p.name))
    if strays:
        raise EncodeUsageError(f"{out}: holds {strays[0]} (and {len(strays) - 1} more) but no {MANIFEST}; "
                               "choose another `out` or pass `overwrite`")
    folder = OutputFolder(out, manifest)
    folder.recover()
    return folder, []

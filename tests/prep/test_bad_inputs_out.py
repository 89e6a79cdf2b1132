"""``prep pack --out``: nothing is deleted that padless did not write, a failure leaves the previous set as it was.

The data-loss cases run the installed ``prep`` command in a subprocess and compare every file under the test's
folder (path and bytes) before and after. Crash and disk-full cases patch the writer in-process or in a child.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from padless.prep import output
from padless.prep.cli import main
from padless.prep.errors import PrepError
from padless.prep.pipeline import PackConfig, run_pack
from padless.prep.tokenizer import DEFAULT_TOKENIZER
from tests.user_errors import assert_one_line_error, assert_one_line_error_in_process

from .rows import text_rows, write_jsonl

PREP = str(Path(sys.executable).parent / "prep")


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (hidden ones too) -> its bytes (None for a folder)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def prep(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """The installed ``prep pack`` in a fresh process."""
    return subprocess.run([PREP, "pack", "--max-len", "64", "--no-progress", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)  # fmt: skip


def invoke(cwd: Path, monkeypatch, *args: str):
    """``prep pack`` in this process (faster; the same command and error handling)."""
    monkeypatch.chdir(cwd)
    return CliRunner().invoke(main, ["pack", "--max-len", "64", "--no-progress", *args])


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A user's folder: a dataset, a dataset folder, a tokenizer folder and a file of their own."""
    write_jsonl(tmp_path / "data.jsonl", text_rows(20))
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "mydata.jsonl", text_rows(20, seed=1))
    (tmp_path / "tok").mkdir()
    for f in DEFAULT_TOKENIZER.iterdir():
        (tmp_path / "tok" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "notes.txt").write_text("mine")
    return tmp_path


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["data.jsonl", "--out", ".", "--overwrite"], r"--out '\.' is the working directory; choose a new folder"),
        (["data.jsonl", "--out", "."], r"--out '\.' is the working directory"),
        (["data.jsonl", "--out", "..", "--overwrite"], r"--out '\.\.' holds the working directory"),
        (["data/mydata.jsonl", "--out", "data", "--overwrite"], r"--out 'data' holds the input 'data/mydata.jsonl'"),
        (["data", "--out", "data", "--overwrite"], r"--out 'data' is the input 'data'"),
        (["data.jsonl", "--out", "data.jsonl", "--overwrite"], r"--out 'data.jsonl' is the input 'data.jsonl'"),
        (["data", "--out", "data/packed"], r"--out 'data/packed' is inside the input 'data'"),
        (["data.jsonl", "--tokenizer", "tok", "--out", "tok", "--overwrite"], r"--out 'tok' is the input 'tok'"),
        (["data.jsonl", "--tokenizer", "tok/tokenizer.json", "--out", "tok/o"], r"--out 'tok/o' is inside the input"),
        (["data.jsonl", "--out", "data", "--overwrite"], r"--out 'data' is not a padless shard set \(it has no "
                                                          r"manifest.json\); --overwrite replaces only a shard set"),
        (["data.jsonl", "--out", "data"], r"--out 'data' already exists and is not empty; .* --overwrite"),
        (["data.jsonl", "--out", "notes.txt", "--overwrite"], r"--out 'notes.txt' is a file"),
    ],
    ids=["cwd", "cwd-no-overwrite", "parent-of-cwd", "holds-input", "is-input-folder", "is-input-file",
         "inside-input", "tokenizer-folder", "inside-tokenizer", "not-a-shard-set", "not-empty", "a-file"],
)  # fmt: skip
def test_refused_outputs_lose_nothing(work: Path, args: list[str], match: str) -> None:
    (work / "sub").mkdir()
    write_jsonl(work / "sub" / "data.jsonl", text_rows(20))
    cwd = work / "sub" if ".." in args else work
    before = snapshot(work)
    assert_one_line_error_in_process(prep(cwd, *args), match)
    assert snapshot(work) == before


def _shard_set(work: Path, name: str = "packed", **kw) -> Path:
    cfg = PackConfig(datasets=(str(work / "data.jsonl"),), max_len=64, out=str(work / name), progress=False, **kw)
    run_pack(cfg)
    return work / name


def test_overwrite_replaces_a_shard_set_and_leaves_nothing_hidden(work: Path) -> None:
    out = _shard_set(work, "packed", eval_examples=3)
    assert (out / "eval" / "manifest.json").is_file()
    old = json.loads((out / "manifest.json").read_text())["fingerprint"]
    proc = prep(work, "data.jsonl", "--out", "packed", "--overwrite", "--seed", "7")
    assert proc.returncode == 0, proc.stderr
    assert "packed -> packed" in proc.stdout
    assert json.loads((out / "manifest.json").read_text())["fingerprint"] != old
    assert not (out / "eval").exists(), "the old set's eval/ went with it"
    assert sorted(p.name for p in work.iterdir()) == ["data", "data.jsonl", "notes.txt", "packed", "tok"]


@pytest.mark.parametrize(
    ("spoil", "match"),
    [
        (lambda o: (o / "keep.txt").write_text("mine"), r"it holds 'keep.txt', which prep pack never writes"),
        (lambda o: (o / ".hidden").write_text("mine"), r"it holds '.hidden'"),
        (lambda o: (o / "manifest.json").write_text('{"format": "x"}'), r"does not name the format 'padless-shards'"),
        (lambda o: (o / "manifest.json").write_bytes(b"\xff\xfe{"), r"its manifest.json cannot be read as JSON"),
        (lambda o: (o / "manifest.json").unlink(), r"it has no manifest.json"),
        (lambda o: (o / "eval").mkdir() or (o / "eval" / "x.arrow").write_text("x"), r"its eval/ is not a shard set"),
        (lambda o: (o / "shard-00009.arrow").symlink_to(o.parent / "notes.txt"), r"it holds 'shard-00009.arrow'"),
    ],
    ids=["user-file", "hidden-file", "other-format", "undecodable", "no-manifest", "bad-eval", "symlinked-shard"],
)  # fmt: skip
def test_overwrite_refuses_a_folder_that_is_not_exactly_a_shard_set(work: Path, monkeypatch, spoil, match) -> None:
    out = _shard_set(work)
    spoil(out)
    assert output.not_a_shard_set(out) is not None
    before = snapshot(work)
    assert_one_line_error(invoke(work, monkeypatch, "data.jsonl", "--out", "packed", "--overwrite"), match)
    assert snapshot(work) == before


def test_out_inside_a_shard_set_or_a_symlink_is_refused(work: Path, monkeypatch) -> None:
    _shard_set(work)
    (work / "link").symlink_to(work / "packed")
    before = snapshot(work)
    for out, match in (("packed/sub", r"is inside the shard set .*packed'"), ("packed/eval", r"inside the shard set"),
                       ("link", r"--out 'link' is a symbolic link")):  # fmt: skip
        assert_one_line_error(invoke(work, monkeypatch, "data.jsonl", "--out", out, "--overwrite"), match)
    assert snapshot(work) == before


_KILL_IN_WRITER = """
import os, signal, sys
import padless.shards.writer as w
add = w.ShardWriter.add_packs
def add_then_die(self, *a, **k):
    add(self, *a, **k)
    os.kill(os.getpid(), signal.SIGKILL)
w.ShardWriter.add_packs = add_then_die
from padless.prep.cli import main
main(sys.argv[1:])
"""


def test_a_killed_run_leaves_only_its_staging_folder_which_the_next_run_removes(work: Path, monkeypatch) -> None:
    out = _shard_set(work)
    before = snapshot(work)
    args = ["pack", "data.jsonl", "--max-len", "32", "--out", "packed", "--overwrite", "--no-progress"]
    proc = subprocess.run([sys.executable, "-c", _KILL_IN_WRITER, *args], cwd=work, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = {k: v for k, v in snapshot(work).items() if k not in before}
    assert left and all(k.startswith(".packed.padless-staging-") for k in left), sorted(left)
    assert {k: v for k, v in snapshot(work).items() if k in before} == before, "the previous set is intact"
    # A staging folder of a live process is someone else's run in progress: kept.
    live = work / f".packed.padless-staging-{os.getppid()}-0123abcd"
    live.mkdir()
    r = invoke(work, monkeypatch, "data.jsonl", "--out", "packed", "--overwrite", "--max-len", "48")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "manifest.json").read_text())["max_len"] == 48
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".")) == [live.name]


_TERM_IN_WRITER = _KILL_IN_WRITER.replace("SIGKILL", "SIGTERM")
# SIGTERM once the first chunk is in the tokenizer (its worker processes are running with --num-proc 2).
_TERM_IN_TOKENIZER = _TERM_IN_WRITER.replace("padless.shards.writer as w", "padless.prep.tokenize as w").replace(
    "w.ShardWriter.add_packs", "w.Encoder.put"
)


@pytest.mark.parametrize(("script", "num_proc"), [(_TERM_IN_WRITER, "1"), (_TERM_IN_TOKENIZER, "2")],
                         ids=["writing", "tokenizing"])  # fmt: skip
def test_sigterm_cleans_up_as_ctrl_c_does(work: Path, script: str, num_proc: str) -> None:
    """SIGTERM (``kill``, ``timeout``, a scheduler) is caught: the run removes its staging folder and spill, leaves
    the previous set as it was and exits with status 143; tokenizer workers end with it."""
    _shard_set(work)
    before = snapshot(work)
    args = ["pack", "data.jsonl", "--max-len", "32", "--out", "packed", "--overwrite", "--no-progress", "--num-proc",
            num_proc]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=work, capture_output=True, timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert b"Traceback" not in proc.stderr, proc.stderr
    assert snapshot(work) == before


def test_a_tokenizer_worker_dies_of_sigterm_at_once() -> None:
    """A worker starts with SIGTERM's default action, not the parent's Python handler, which would wait until the
    worker's batch left the tokenizer's native code (the parent's terminate() would wait that long)."""
    from padless.prep.tokenize import _set_tokenizer, _start_worker

    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        _start_worker(None)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        _set_tokenizer(None)
        signal.signal(signal.SIGTERM, previous)


def test_a_crash_between_the_two_renames_is_repaired_by_the_next_run(work: Path, monkeypatch) -> None:
    """Without an atomic exchange, publish() moves the old set aside, then the new one in; if the process dies in
    between, the next run puts the old set back before anything else."""
    out = _shard_set(work)
    before = snapshot(work)
    stage = output.new_staging(out)
    (stage / "new").mkdir()
    monkeypatch.setattr(output, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def rename(src, dst):
        if Path(src) == stage / "new":
            raise KeyboardInterrupt  # the process dies here
        real_rename(src, dst)

    monkeypatch.setattr(output.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        output.publish(stage, out)
    monkeypatch.setattr(output.os, "rename", real_rename)
    assert not out.exists() and (stage / "old" / "manifest.json").is_file()
    # The staging folder carries this process's id, so it reads as an earlier run's: the next run restores the old
    # set first, then finds --out taken.
    r = invoke(work, monkeypatch, "data.jsonl", "--out", "packed")
    assert_one_line_error(r, r"--out 'packed' already exists and is not empty; .* --overwrite")
    assert snapshot(work) == before


def test_publish_exchanges_atomically_where_the_os_can(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not output._exchange(a, b):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


@pytest.mark.parametrize("split", ["train", "eval"])
def test_disk_full_while_writing_is_one_line_and_keeps_the_previous_set(work: Path, monkeypatch, split: str) -> None:
    import padless.shards.writer as writer

    monkeypatch.chdir(work)
    out = _shard_set(work)
    before = snapshot(work)
    real = writer.ShardWriter._write_batch

    def full(self, *a, **k):
        if split == "train" or self.path.name == "eval":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self._tmp / "shard-00000.arrow"))
        real(self, *a, **k)

    monkeypatch.setattr(writer.ShardWriter, "_write_batch", full)
    args = ["pack", "data.jsonl", "--max-len", "32", "--out", "packed", "--overwrite", "--no-progress",
            "--eval-examples", "2"]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert_one_line_error(r, r"cannot write the shard set to --out 'packed': No space left on device \(.*\); the "
                             r"shard set already there is unchanged")  # fmt: skip
    assert snapshot(work) == before
    assert (out / "manifest.json").is_file()
    # A new --out under folders that do not exist yet: the folders this run made go too.
    r = CliRunner().invoke(main, [a if a != "packed" else "new/deeper/packed" for a in args])
    assert_one_line_error(r, r"No space left on device .*; nothing was written")
    assert snapshot(work) == before


def test_a_permission_error_while_swapping_is_one_line(work: Path, monkeypatch) -> None:
    monkeypatch.chdir(work)
    out = _shard_set(work)
    before = snapshot(work)

    def denied(stage, target):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(target))

    monkeypatch.setattr(output, "publish", denied)
    r = CliRunner().invoke(main, ["pack", "data.jsonl", "--max-len", "32", "--out", "packed", "--overwrite"])
    assert_one_line_error(r, r"cannot write the shard set to --out 'packed': Permission denied \(packed\)")
    assert snapshot(work) == before and out.is_dir()


def test_library_callers_get_the_same_checks(work: Path, monkeypatch) -> None:
    monkeypatch.chdir(work)
    with pytest.raises(PrepError, match=r"--out '\.' is the working directory"):
        run_pack(PackConfig(datasets=("data.jsonl",), max_len=64, out=".", overwrite=True, progress=False))
    assert (work / "notes.txt").read_text() == "mine"


def test_a_run_that_finds_out_taken_when_it_finishes_replaces_nothing(work: Path, monkeypatch) -> None:
    """Two runs into one new --out: both pass the checks at the start; the one that finishes second, without
    --overwrite, must not replace the first one's set."""
    import padless.prep.pipeline as pipeline

    monkeypatch.chdir(work)
    real_save = pipeline._save_config
    other: dict[str, str] = {}

    def meanwhile(cfg, new):
        real_save(cfg, new)
        if not other:  # the other run, started at the same time in another process, finishes first
            proc = prep(work, "data.jsonl", "--max-len", "48", "--out", "packed")
            assert proc.returncode == 0, proc.stderr
            other["fingerprint"] = json.loads((work / "packed" / "manifest.json").read_text())["fingerprint"]

    monkeypatch.setattr(pipeline, "_save_config", meanwhile)
    r = CliRunner().invoke(main, ["pack", "data.jsonl", "--max-len", "32", "--out", "packed", "--no-progress"])
    assert_one_line_error(r, r"--out 'packed' was filled by another process while this run packed; nothing was "
                             r"replaced: .*--overwrite")  # fmt: skip
    assert json.loads((work / "packed" / "manifest.json").read_text())["fingerprint"] == other["fingerprint"]
    assert sorted(p.name for p in work.iterdir()) == ["data", "data.jsonl", "notes.txt", "packed", "tok"]


def test_overwrite_replaces_nothing_that_stopped_being_a_shard_set_while_it_packed(work: Path, monkeypatch) -> None:
    import shutil

    import padless.prep.pipeline as pipeline

    monkeypatch.chdir(work)
    out = _shard_set(work)
    real_save = pipeline._save_config

    def meanwhile(cfg, new):
        real_save(cfg, new)
        shutil.rmtree(out)
        out.mkdir()
        (out / "mine.txt").write_text("mine")

    monkeypatch.setattr(pipeline, "_save_config", meanwhile)
    r = CliRunner().invoke(main, ["pack", "data.jsonl", "--max-len", "32", "--out", "packed", "--overwrite"])
    assert_one_line_error(r, r"--out 'packed' is not a padless shard set \(it has no manifest.json\); --overwrite")
    assert (out / "mine.txt").read_text() == "mine"
    assert sorted(p.name for p in work.iterdir()) == ["data", "data.jsonl", "notes.txt", "packed", "tok"]

"""The one writer: whole files, the user's umask, gem-jax's own temporaries cleaned up, and
ownership: only what gem-jax recorded writing is replaced or deleted."""

from __future__ import annotations

import os
import stat

import pytest

from gem_jax import files


def test_written_files_are_whole_owned_and_follow_the_umask(tmp_path):
    target = tmp_path / "out.bin"
    files.write_owned(target, lambda f: f.write(b"one"), force=False)
    assert target.read_bytes() == b"one" and files.Ledger(tmp_path).owned(target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~files.umask()
    with pytest.raises(files.OutputError, match="pass --force"):
        files.write_owned(target, lambda f: f.write(b"two"), force=False)
    files.write_owned(target, lambda f: f.write(b"two"), force=True)
    assert target.read_bytes() == b"two"
    assert not [p for p in tmp_path.iterdir() if files.is_temp_name(p.name)]


def test_a_file_changed_since_is_the_users_and_never_replaced(tmp_path):
    target = tmp_path / "out.bin"
    files.write_owned(target, lambda f: f.write(b"ours"), force=False)
    target.write_bytes(b"edited by hand")
    for force in (False, True):
        with pytest.raises(files.OutputError) as e:
            files.write_owned(target, lambda f: f.write(b"again"), force=force)
        assert "was not written by gem-jax" in str(e.value) and "--force" not in str(e.value)
    assert not files.remove_owned(target) and target.read_bytes() == b"edited by hand"
    (tmp_path / "theirs.txt").write_text("x")
    assert not files.remove_owned(tmp_path / "theirs.txt")


def test_a_kill_between_the_note_and_the_rename_leaves_nothing_foreign(tmp_path):
    """The ledger notes a new version before it takes its name: killed in between, the old
    version stays gem-jax's and the next run goes on."""
    target = tmp_path / "manifest.json"
    files.write_owned(target, lambda f: f.write(b"v1"), force=False)
    fd, temp = files.open_temp(target)
    os.write(fd, b"version two")
    os.close(fd)
    files.Ledger(tmp_path).record_as(target, temp)  # ... and the process dies here
    assert files.Ledger(tmp_path).owned(target)  # the old version is still ours
    os.replace(temp, target)  # had it lived: the new one is ours too
    assert files.Ledger(tmp_path).owned(target)


def test_stale_temporaries_of_dead_processes_only(tmp_path):
    import subprocess
    import sys

    code = "import os, sys; from gem_jax import files; fd, t = files.open_temp(sys.argv[1]); os.kill(os.getpid(), 9)"
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path / "x")]).returncode == -9
    mine_fd, mine = files.open_temp(tmp_path / "y")  # this process is alive: its temporary stays
    os.close(mine_fd)
    removed = files.remove_stale(tmp_path)
    assert len(removed) == 1 and os.path.exists(mine)

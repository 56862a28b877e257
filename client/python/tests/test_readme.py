"""README.md's snippets, run as written against a live storaged, so the
README cannot drift from the software: every block after a
``<!-- readme-test: shell -->`` or ``<!-- readme-test: python -->`` marker.
Only the server address is put in (the README shows the default port)."""

import os
import pathlib
import re
import subprocess
import sys

from conftest import BIN, ROOT, pattern, write_tree

README = (ROOT / "README.md").read_text()


def blocks(kind):
    found = re.findall(r"<!-- readme-test: (\w+) -->\n```\w*\n(.*?)```", README, re.S)
    return [code for k, code in found if k == kind]


def test_the_readme_has_runnable_snippets():
    # Guards against the markers going missing, which would turn the test
    # below into one that checks nothing.
    assert len(blocks("shell")) >= 1 and len(blocks("python")) >= 1


def test_readme_snippets_run_as_written(fresh_daemon, tmp_path):
    # Guards against README drift: its commands and its Python snippet
    # (imports, names, a transform that runs) must work when pasted.
    tree = {f"train/n01440764/img_{i:03d}.JPEG": pattern(i, 3000 + 37 * i) for i in range(1, 25)}
    tree.update({f"train/n01443537/img_{i:03d}.JPEG": pattern(100 + i, 2000 + 11 * i) for i in range(1, 25)})
    write_tree(tmp_path / "some" / "dir", tree)
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", STORAGED_URL=fresh_daemon.url)
    for code in blocks("shell"):
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, f"{code}\n--- stdout\n{run.stdout}\n--- stderr\n{run.stderr}"
    assert (tmp_path / "x.jpg").read_bytes() == tree["train/n01440764/img_001.JPEG"]
    assert (tmp_path / "part").read_bytes() == tree["train/n01440764/img_001.JPEG"][100:150]
    restored = {str(p.relative_to(tmp_path / "restored")): p.read_bytes()
                for p in (tmp_path / "restored").rglob("*") if p.is_file()}
    assert restored == tree
    for code in blocks("python"):
        code = code.replace("http://127.0.0.1:7400", fresh_daemon.url)
        run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0, f"{code}\n--- stdout\n{run.stdout}\n--- stderr\n{run.stderr}"
        assert "48 samples per rank" in run.stdout and "6 batches per rank" in run.stdout, run.stdout

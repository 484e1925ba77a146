"""The documentation runs: every code block of README.md and docs/*.md that is meant to run
does, on a tiny model with random weights (tests/tiny.py's TINY, written with save_native).

- Every ``gem-jax`` line of a bash block, run or not, parses with the real argument parser,
  and every ``--flag`` in inline code is an option of the command it is shown with (the
  command of a ``gem-jax COMMAND ...`` span, else of the ``gem-jax COMMAND`` heading above
  it, else any command): a flag that disappears, or a value it no longer takes, fails here.
- Every bash block's ``gem-jax`` lines and every python block run in document order, in a
  fresh folder per document holding the files the examples name (``photo.jpg``,
  ``photos/``, ``prompts.txt``, a tar shard, a small VOC, ...), with the substitution table
  below, and must succeed (exit status 0; a python block must not raise). A ``gem-jax
  demo`` line starts the server as its own process, for the blocks after it.
- A line, or a python block, holding ``# not run in the tests: <reason>`` is only parsed
  (a python block is compiled): for what needs the network, a cluster or a full-size
  timing.
- Relative links point at files and headings that exist.

The lines run through ``gem_jax.cli.main`` (what ``python -m gem_jax.cli`` calls) in one
child process, ``python tests/test_docs.py WORK RESULTS``, so JAX and gem-jax are imported
once and every command shares one compilation cache from the start; the patches the
substitutions need (two tiny architectures, GEM's protocol at 32 pixels) stay in that
process.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import pathlib
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import traceback
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = "# not run in the tests:"
#: Links to documents another change adds (placeholders the maintainer completes).
PENDING_LINKS: set[str] = set()
#: Commands that run a model, and so get the tiny model when the line names none.
MODEL_COMMANDS = ("segment", "batch", "export", "eval", "demo")
#: The image size every example runs at.
SIZE = "32"
#: GEM's (and CLIP Surgery's) blocks on the tiny model, where a line gives none.
LAYERS = "1"

# ----------------------------------------------------------------------------- the substitution table
# On gem-jax lines, besides these: $DATA and $OUT are the document folder's data/ and out_eval/;
# segment, batch, export, eval and demo lines naming no model get --model (the tiny model), the
# first three --size 32 when they give no size, gem and clipsurgery lines --gem-layers 1 when
# they give none (every model here has 3 blocks), and lines that run a model the shared
# --compile-cache.

#: Model names in the examples -> the tiny model.
MODEL_NAMES = ("ViT-B/16:openai", "ViT-B/16-quickgelu:metaclip_400m")
#: Flag values replaced on ``gem-jax`` lines: flag -> the value the test runs instead
#: (``tiny-test`` is TINY, ``tiny-bench`` TINY with the six blocks bench's GEM needs).
FLAG_VALUES = {"--size": SIZE, "--short-side": SIZE, "--arch": "tiny-bench", "--random": "tiny-test",
               "--rounds": "1", "--images": "4", "--port": "{port}"}
#: Text replaced in python blocks (the model names too, and the demo's address by the one it runs at).
PYTHON_TEXT = {"layers=6": f"layers={LAYERS}", "size=448": f"size={SIZE}", 'size="448"': f'size="{SIZE}"',
               "http://127.0.0.1:7860/": "{url}"}


# ----------------------------------------------------------------------------- reading the documents


@dataclasses.dataclass
class Block:
    doc: str
    line: int
    lang: str
    text: str


def code_blocks(path: pathlib.Path) -> list[Block]:
    """The fenced code blocks of a Markdown file (indented ones in lists included)."""
    out, lines = [], path.read_text("utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start, body = m.group(1), m.group(2), i + 1, []
        i += 1
        while i < len(lines) and not re.match(rf"^{indent}```\s*$", lines[i]):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        name = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name
        out.append(Block(name, start + 1, lang, "\n".join(body)))
        i += 1
    return out


def command_lines(block: Block) -> list[tuple[int, str, bool]]:
    """(line number, command, skipped) of the ``gem-jax`` commands of a bash block:
    continuation lines joined, comment lines left out, ``a && gem-jax ...`` split."""
    out, pending, first = [], "", None
    for n, raw in enumerate(block.text.splitlines()):
        if not raw.strip() or (raw.lstrip().startswith("#") and not pending):
            continue
        first = block.line + n if not pending else first
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line, pending = pending + raw, ""
        skipped = SKIP in line
        for part in re.split(r"\s&&\s|;\s", line):
            part = part.strip()
            if part.startswith("gem-jax"):
                out.append((first, part, skipped))
    return out


def argv_of(command: str) -> list[str]:
    """A documented command as arguments (the comment dropped, ``gem-jax`` left off)."""
    words = shlex.split(command, comments=True)
    assert words[0] == "gem-jax", command
    return words[1:]


def parsers():
    """``{command: its parser}`` and the top-level parser of ``gem-jax``."""
    from gem_jax.cli import build_parser

    top = build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return top, dict(sub.choices)


def options_of(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def github_slug(heading: str) -> str:
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def headings(path: pathlib.Path) -> list[tuple[int, int, str]]:
    """(line index, level, text) of the headings outside code blocks."""
    out, fenced = [], False
    for i, line in enumerate(path.read_text("utf-8").splitlines()):
        if re.match(r"^\s*```", line):
            fenced = not fenced
        elif not fenced and (m := re.match(r"^(#+)\s+(.*)$", line)):
            out.append((i, len(m.group(1)), m.group(2)))
    return out


# ----------------------------------------------------------------------------- checks without running


def unparsable_commands(doc: pathlib.Path) -> list[str]:
    """The ``gem-jax`` lines of the bash blocks that the argument parser refuses."""
    top, _ = parsers()
    bad = []
    for block in code_blocks(doc):
        if block.lang != "bash":
            continue
        for line, command, _ in command_lines(block):
            try:
                with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()):
                    top.parse_args(argv_of(command))
            except SystemExit as e:
                if e.code:  # --version and --help exit 0
                    bad.append(f"{block.doc}:{line}: {command}\n    {err.getvalue().strip()}")
    return bad


def unknown_flags(doc: pathlib.Path) -> list[str]:
    """``--flags`` in inline code that the command they are shown with does not have: the
    command of a ``gem-jax COMMAND ...`` span, else of the ``gem-jax COMMAND`` heading the
    span is under, else any command."""
    top, commands = parsers()
    everything = options_of(top).union(*(options_of(p) for p in commands.values()))
    heads = {i: (lvl, text) for i, lvl, text in headings(doc)}
    current, level_of, fenced, bad = None, 0, False, []
    for i, line in enumerate(doc.read_text("utf-8").splitlines()):
        if i in heads:
            lvl, text = heads[i]
            m = re.match(r"^`gem-jax (\w+)`", text.strip())
            if m and m.group(1) in commands:
                current, level_of = m.group(1), lvl
            elif current is not None and lvl <= level_of:
                current = None
        if re.match(r"^\s*```", line):
            fenced = not fenced
            continue
        if fenced:
            continue
        for span in re.findall(r"`([^`]+)`", line):
            words = span.replace("\\|", "|").split()
            if not words:
                continue
            if words[0] == "gem-jax" and len(words) > 1 and words[1] in commands:
                allowed, where = options_of(commands[words[1]]) | options_of(top), f"gem-jax {words[1]}"
            elif words[0].startswith("--"):
                allowed = options_of(commands[current]) | options_of(top) if current else everything
                where = f"gem-jax {current}" if current else "gem-jax"
            else:
                continue
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", " ".join(words)):
                if flag not in allowed:
                    bad.append(f"{doc.name}:{i + 1}: {flag} ({where}) in `{span}`")
    return bad


def broken_links(doc: pathlib.Path) -> list[str]:
    """Relative links to files or headings that do not exist."""
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text("utf-8")):
        if re.match(r"^[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        rel = str(dest.relative_to(ROOT)) if dest.is_relative_to(ROOT) else str(dest)
        if rel in PENDING_LINKS:
            continue
        if not dest.exists():
            bad.append(f"{doc.name}: {target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in {github_slug(h) for _, _, h in headings(dest)}:
            bad.append(f"{doc.name}: {target}: no such heading")
    return bad


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_documented_command_parses(doc):
    bad = unparsable_commands(doc)
    assert not bad, "documented commands that do not parse:\n" + "\n".join(bad)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_documented_flag_exists(doc):
    bad = unknown_flags(doc)
    assert not bad, "documented flags that gem-jax does not have:\n" + "\n".join(bad)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_point_at_files_and_headings(doc):
    bad = broken_links(doc)
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_the_checks_can_fail(tmp_path):
    """A flag gem-jax does not have, a bad value, a missing file and heading are all found."""
    doc = tmp_path / "x.md"
    doc.write_text("# x\n\n## `gem-jax segment`\n\n| `--no-such-flag` | `--classes` |\n\n"
                   "| `--pamr` is segment's, `--store` is batch's | `gem-jax batch --store labels` |\n\n"
                   "```bash\ngem-jax segment photo.jpg --size big\ngem-jax models  # not run in the tests: x\n```\n\n"
                   "[a](nowhere.md) [b](#x) [c](#nowhere)\n")
    flags = unknown_flags(doc)
    assert len(flags) == 2 and "--no-such-flag" in flags[0] and "--store (gem-jax segment)" in flags[1], flags
    (bad,) = unparsable_commands(doc)
    assert "--size big" in bad
    assert broken_links(doc) == ["x.md: nowhere.md: no such file", "x.md: #nowhere: no such heading"]
    assert [skipped for _, _, skipped in command_lines(code_blocks(doc)[0])] == [False, True]


# ----------------------------------------------------------------------------- running the blocks


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """Runs every document's blocks in one child process; ``{doc: [result, ...]}``."""
    work = tmp_path_factory.mktemp("docs")
    results = work / "results.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__, str(work), str(results)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0 and results.exists(), proc.stderr[-5000:]
    out: dict[str, list] = {}
    for r in json.loads(results.read_text()):
        out.setdefault(r["doc"], []).append(r)
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_block_runs(ran, doc):
    name = str(doc.relative_to(ROOT))
    failed = [f"{r['doc']}:{r['line']}: {r['what']}\n{r['output']}" for r in ran.get(name, []) if not r["ok"]]
    assert not failed, "documented examples that fail:\n\n" + "\n\n".join(failed)


def test_the_runnable_examples_were_found(ran):
    """The runner ran what the documents promise: the README's set-up command, the pandas
    and load_results snippets, the export serving snippet, and the demo's API call."""
    done = {(r["doc"], r["kind"]): r for doc in ran.values() for r in doc}
    assert any(r["what"].startswith("gem-jax segment --example -p cat") for r in ran["README.md"])
    python = [r["what"] for doc in ran.values() for r in doc if r["kind"] == "python"]
    for needle in ("pd.read_parquet", "gem_jax.load_results", "jax.export.deserialize", "gradio_client",
                   "register_method"):
        assert any(needle in text for text in python), needle
    assert ("docs/DEMO.md", "server") in done


# ----------------------------------------------------------------------------- the child process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_image(path: pathlib.Path, h: int = 40, w: int = 56, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def make_workspace(root: pathlib.Path) -> None:
    """The files the examples name."""
    import numpy as np
    from PIL import Image

    for i, name in enumerate(["photo.jpg", "cat.jpg", "a.jpg", "b.jpg", "more_photos/m0.jpg", "more_photos/m1.jpg",
                              "shots/s0.png", "shots/s1.png", "photos/p0.jpg", "photos/p1.jpg",
                              "photos/sub/p2.png", "more/x0.jpg", "more/x1.jpg"]):
        _write_image(root / name, seed=i)
    (root / "list.txt").write_text("# inputs, one a line\nphoto.jpg\ncat.jpg\n")
    (root / "prompts.txt").write_text("cat\ndog\na red car\n")
    (root / "vocabulary.txt").write_text("".join(f"thing number {i}\n" for i in range(20)))
    (root / "users.txt").write_text("alice:secret\n")
    (root / "shards").mkdir()
    with tarfile.open(root / "shards" / "000.tar", "w") as tar:
        for i, key in enumerate(["k0", "k1"]):
            buf = io.BytesIO()
            Image.fromarray(np.full((30, 40, 3), 60 * i, np.uint8)).save(buf, format="JPEG")
            for name, data in ((f"{key}.jpg", buf.getvalue()), (f"{key}.json", b'{"id": 1}')):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    voc = root / "data" / "VOCdevkit" / "VOC2012"
    from gem_jax.eval import datasets

    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"im{i}.jpg")
        label = Image.fromarray(rng.integers(0, 3, (40, 48), dtype=np.uint8), mode="P")
        label.putpalette(datasets.voc_palette().reshape(-1).tolist())
        label.save(voc / "SegmentationClass" / f"im{i}.png")
    (voc / "ImageSets/Segmentation/val.txt").write_text("im0\nim1\n")
    (root / "out_eval").mkdir()
    (root / "weights").mkdir()


class Runner:
    """Runs the blocks of the documents (in the child process)."""

    def __init__(self, work: pathlib.Path):
        import dataclasses as dc

        from gem_jax import config
        from gem_jax.cli.common import enable_compile_cache
        from gem_jax.eval import protocols
        from tiny import TINY, save_tiny

        self.work = work
        self.cache = str(work / "xla")
        enable_compile_cache(self.cache)  # before anything compiles: every command shares it
        self.model = str(work / "tiny-model")
        save_tiny(self.model, seed=0, random_weights=True)
        # what convert --random and bench --arch name: the tiny CLIP, and for bench (whose GEM has
        # its default six layers) the same with six vision blocks
        config.ARCHITECTURES["tiny-test"] = TINY
        config.ARCHITECTURES["tiny-bench"] = dc.replace(TINY, vision=dc.replace(TINY.vision, layers=6))
        protocols.PROTOCOLS["gem"] = dc.replace(protocols.GEM_PROTOCOL, short_side=int(SIZE))
        self.template = work / "template"
        make_workspace(self.template)
        os.environ["GEM_JAX_CACHE"] = str(work / "cache")
        self.results: list[dict] = []
        self.servers: list[subprocess.Popen] = []
        self.port, self.url = None, None

    # substitutions ---------------------------------------------------------------------------------------
    def substitute_argv(self, argv: list[str]) -> list[str]:
        out = []
        for i, word in enumerate(argv):
            if word in MODEL_NAMES:
                word = self.model
            elif i > 0 and argv[i - 1] in FLAG_VALUES:
                word = FLAG_VALUES[argv[i - 1]].format(port=self.port)
            out.append(os.path.expandvars(word))
        command = out[0] if out else ""
        added = []
        if command in MODEL_COMMANDS and "--model" not in out:
            added += ["--model", self.model]
        if command in ("segment", "batch", "export") and not {"--size", "--short-side"} & set(out):
            added += ["--size", SIZE]
        if command in MODEL_COMMANDS[:-1] and "--gem-layers" not in out and self.method_of(out) in (
                "gem", "clipsurgery"):
            added += ["--gem-layers", LAYERS]  # every model here has 3 blocks, these methods' default is 6
        if command in MODEL_COMMANDS and "--no-compile-cache" not in out and "--compile-cache" not in out:
            added += ["--compile-cache", self.cache]
        cut = out.index("--") if "--" in out else len(out)  # what follows -- is positional
        return out[:cut] + added + out[cut:]

    @staticmethod
    def method_of(argv: list[str]) -> str:
        """The method a command line runs: ``--method``, else the protocol's, else gem."""
        for flag in ("--method", "--protocol"):
            if flag in argv and argv.index(flag) + 1 < len(argv):
                value = argv[argv.index(flag) + 1]
                return value if flag == "--method" or value != "gem" else "gem"
        return "gem"

    def substitute_python(self, text: str) -> str:
        for a, b in PYTHON_TEXT.items():
            text = text.replace(a, b.format(url=self.url))
        for name in MODEL_NAMES:
            text = text.replace(repr(name), repr(self.model)).replace(f'"{name}"', repr(self.model))
        return text

    # running ----------------------------------------------------------------------------------------------
    def record(self, block: Block, line: int, kind: str, what: str, ok: bool, output: str, seconds: float):
        self.results.append(dict(doc=block.doc, line=line, kind=kind, what=what, ok=ok, output=output[-4000:],
                                 seconds=round(seconds, 2)))
        print(f"{'ok ' if ok else 'FAIL'} {seconds:6.1f}s {block.doc}:{line} {what[:100]}", file=sys.__stderr__,
              flush=True)

    def run_command(self, block: Block, line: int, command: str):
        from gem_jax.cli import main

        argv = self.substitute_argv(argv_of(command))
        if argv and argv[0] == "demo":
            return self.start_server(block, line, command, argv)
        start, buf = time.perf_counter(), io.StringIO()
        try:
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                code = main(argv)
        except SystemExit as e:
            code = e.code
        except BaseException:
            code, _ = "exception", buf.write(traceback.format_exc())
        self.record(block, line, "bash", command, code == 0,
                    f"ran: gem-jax {shlex.join(argv)}\nexit status {code}\n{buf.getvalue()}",
                    time.perf_counter() - start)

    def start_server(self, block: Block, line: int, command: str, argv: list[str]):
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "gem_jax.cli", *argv], cwd=os.getcwd(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.servers.append(proc)
        lines = []
        while time.perf_counter() - start < 240:
            text = proc.stdout.readline()
            if not text:
                break
            lines.append(text)
            if m := re.search(r"running on (\S+)", text):
                self.url = m.group(1).rstrip("/") + "/"
                break
        ok = self.url is not None and proc.poll() is None
        self.record(block, line, "server", command, ok, f"ran: gem-jax {shlex.join(argv)}\n{''.join(lines)}",
                    time.perf_counter() - start)

    def run_python(self, block: Block, namespace: dict):
        text = self.substitute_python(block.text)
        start, buf = time.perf_counter(), io.StringIO()
        try:
            code = compile(text, f"{block.doc}:{block.line}", "exec")
            ok = True
            if SKIP not in block.text:
                with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                    exec(code, namespace)
        except BaseException:
            ok = False
            buf.write(traceback.format_exc())
        self.record(block, block.line, "python" if SKIP not in block.text else "compiled", block.text, ok,
                    buf.getvalue(), time.perf_counter() - start)

    def run_doc(self, doc: pathlib.Path):
        folder = self.work / "run" / doc.stem
        shutil.copytree(self.template, folder)
        cwd = os.getcwd()
        os.chdir(folder)
        os.environ.update(GEM_JAX_WEIGHTS=str(folder / "weights"), DATA=str(folder / "data"),
                          OUT=str(folder / "out_eval"))
        self.port, self.url = _free_port(), None
        module = types.ModuleType(f"doc_{doc.stem.lower()}")  # the snippets' module (dataclasses look it up)
        sys.modules[module.__name__] = module
        namespace = module.__dict__
        try:
            for block in code_blocks(doc):
                if block.lang == "bash":
                    for line, command, skipped in command_lines(block):
                        if not skipped:
                            self.run_command(block, line, command)
                elif block.lang == "python":
                    self.run_python(block, namespace)
        finally:
            os.chdir(cwd)
            for proc in self.servers:
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
            self.servers = []


def _child(work: str, results: str) -> None:
    runner = Runner(pathlib.Path(work))
    for doc in DOCS:
        runner.run_doc(doc)
    pathlib.Path(results).write_text(json.dumps(runner.results, indent=1))


if __name__ == "__main__":
    _child(*sys.argv[1:3])

"""The docs cannot drift from the code: every shell and Python example in README.md and docs/*.md runs.

Each fenced ```bash, ```sh or ```python block is executed against one live server started like the
README's first command (torchrun, tp = 2, CPU, the embedded all-MiniLM-L6-v2): bash blocks with
`bash -euo pipefail`, Python blocks with this interpreter, each in a fresh directory with the repository
on PYTHONPATH. `localhost:30000` / `127.0.0.1:30000` in a block become the test server's address and
`/tmp/` becomes the block's directory. A block is left out only when the line before its fence is

    <!-- docs-test: skip (REASON) -->

with a reason: it needs a GPU, the hub, several nodes, installs packages, or starts in the foreground
the server this test already runs. Shell commands in a fence without a language fail the test: they
would escape it.

docs/models.md's family table is checked against the tests and tp_embed/models' ARCHITECTURES.
"""

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from server_utils import REPO, ServerProcess
from tp_embed.models import ARCHITECTURES, SPARSE_ARCHITECTURES

DOC_FILES = [Path(REPO, "README.md"), *sorted(Path(REPO, "docs").glob("*.md"))]
RUNNABLE = {"bash": "bash", "sh": "bash", "python": "python"}
FENCE = re.compile(r"^```(\S*)\s*$")
MARKER = re.compile(r"^<!--\s*docs-test:(.*?)-->\s*$")
SKIP = re.compile(r"^\s*skip\s*\((.*\S.*)\)\s*$")
DOC_PORT = re.compile(r"\b(?:localhost|127\.0\.0\.1):30000\b")
# first words of a shell command: a fence without a language that starts with one must say `bash`
SHELL_WORDS = ("torchrun", "curl", "python", "python3", "pip", "bash", "export", ".", "printf")
BLOCK_TIMEOUT = 300.0  # seconds; the offline example starts two ranks of its own on a busy machine

# A reader's `curl ... | head -c 300` closes the pipe early: curl's write error (23) is not the example
# failing. An HTTP error is (22, with --fail-with-body keeping the error body in the output).
CURL_WRAPPER = ('curl() { command curl --fail-with-body --silent --show-error --max-time 120 "$@" '
                '|| { rc=$?; [ "$rc" -eq 23 ] || return "$rc"; }; }\n')


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip_reason: str | None

    @property
    def name(self) -> str:
        return f"{relative(self.path)}:{self.line}"


def relative(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def parse_docs(paths: list[Path]) -> tuple[list[Block], list[str]]:
    """Every runnable fenced block of `paths`, and the problems with markers and untagged fences."""
    blocks, problems = [], []
    for path in paths:
        lines = path.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            where = f"{relative(path)}:{i + 1}"
            m = MARKER.match(lines[i])
            if m:
                nxt = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
                if not SKIP.match(m.group(1)):
                    problems.append(f"{where}: a docs-test marker must read `<!-- docs-test: skip (REASON) -->` "
                                    f"with a reason, got {lines[i]!r}")
                elif not (nxt and nxt.group(1) in RUNNABLE):
                    problems.append(f"{where}: a docs-test marker must be the line right before a ```bash, "
                                    f"```sh or ```python fence")
            m = FENCE.match(lines[i])
            if not m:
                i += 1
                continue
            lang, start = m.group(1), i
            i += 1
            while i < len(lines) and lines[i].rstrip() != "```":
                i += 1
            code = "\n".join(lines[start + 1:i]) + "\n"
            i += 1
            if lang in RUNNABLE:
                skip = MARKER.match(lines[start - 1]) if start > 0 else None
                reason = SKIP.match(skip.group(1)) if skip else None
                blocks.append(Block(path, start + 1, RUNNABLE[lang], code, reason.group(1).strip() if reason else None))
            elif lang == "":
                first = next((ln.split()[0] for ln in code.splitlines() if ln.strip() and not ln.startswith("#")), "")
                if first in SHELL_WORDS:
                    problems.append(f"{relative(path)}:{start + 1}: shell commands in a fence without a "
                                    f"language escape this test; write ```bash (and a skip marker if it cannot run)")
    return blocks, problems


BLOCKS, PROBLEMS = parse_docs(DOC_FILES)
RUN_BLOCKS = [b for b in BLOCKS if b.skip_reason is None]


def readme_server_command() -> tuple[int, list[str]]:
    """(ranks, `tp-embed` args without --port) of the README's first command, which starts the server."""
    first = next(b for b in BLOCKS if b.path.name == "README.md")
    command = next(part for part in first.code.split("&&") if part.split()[0] == "tp-embed")
    args = shlex.split(command)[1:]
    if "--port" in args:
        del args[args.index("--port"):args.index("--port") + 2]
    ranks = 1
    for flag in ("--tp", "--dp"):
        ranks *= int(args[args.index(flag) + 1]) if flag in args else 1
    return ranks, args


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The README's first command as a reader runs it (the venv's `tp-embed`), stopped at the end as a reader
    stops it: Ctrl-C (SIGINT to the command), which must drain and exit 0 without a traceback."""
    ranks, args = readme_server_command()
    log = tmp_path_factory.mktemp("docs-server") / "server.log"
    command = os.path.join(os.path.dirname(sys.executable), "tp-embed")
    with ServerProcess(args, nproc=ranks, log_path=log, launcher=[command]) as s:
        yield s
        s.proc.send_signal(signal.SIGINT)
        code = s.wait(60)
        output = s.log()
        assert code == 0 and "Traceback" not in output, output[-3000:]


def test_markers_and_fences():
    assert not PROBLEMS, "\n".join(PROBLEMS)
    counts = {}
    for b in BLOCKS:
        ran, skipped = counts.get(b.path.name, (0, 0))
        counts[b.path.name] = (ran + (b.skip_reason is None), skipped + (b.skip_reason is not None))
    print("\ndocs blocks run / skipped: " + ", ".join(f"{name} {r}/{s}" for name, (r, s) in counts.items())
          + f"; total {len(RUN_BLOCKS)}/{len(BLOCKS) - len(RUN_BLOCKS)}")
    for b in BLOCKS:
        if b.skip_reason:
            print(f"  skip {b.name}: {b.skip_reason}")


def test_markers_need_a_reason_and_a_fence(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- docs-test: skip -->\n```bash\necho 1\n```\n"
                   "<!-- docs-test: skip () -->\n```python\nprint(1)\n```\n"
                   "<!-- docs-test: skip (a GPU) -->\n\n```bash\necho 2\n```\n"
                   "```\ncurl localhost:30000/health\n```\n"
                   "<!-- docs-test: skip (a GPU) -->\n```sh\nnvidia-smi\n```\n")
    blocks, problems = parse_docs([doc])
    assert [(b.line, b.skip_reason) for b in blocks] == [(2, None), (6, None), (11, None), (18, "a GPU")]
    assert [p.split(":")[1] for p in problems] == ["1", "5", "9", "14"], problems


def test_the_main_examples_run():
    """The examples a reader tries first are not skipped."""
    def runs(file: str, *needles: str) -> bool:
        found = [b for b in BLOCKS if b.path.name == file and all(n in b.code for n in needles)]
        assert found, f"no {file} example holds {needles}"
        return all(b.skip_reason is None for b in found)

    assert runs("README.md", "curl", "/v1/embeddings", '"input": ["A man')
    assert runs("README.md", "OpenAI(", "all-MiniLM-L6-v2")
    assert runs("README.md", '"dimensions": 128')
    assert runs("README.md", "-m tp_embed.offline")
    assert runs("api.md", "curl", "/v1/embeddings")
    assert runs("api.md", "OpenAI(")


def test_server_is_started_like_the_readme():
    """The README's foreground server is skipped because the test's server replaces it: same command, same flags."""
    first = next(b for b in BLOCKS if b.path.name == "README.md")
    assert first.skip_reason and "tp-embed --tp 2" in first.code
    ranks, args = readme_server_command()
    assert ranks == 2 and args[args.index("--tp") + 1] == "2", args


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=[b.name for b in RUN_BLOCKS])
def test_doc_example_runs(block: Block, request, tmp_path):
    code = block.code.replace("/tmp/", f"{tmp_path}/")
    if DOC_PORT.search(code):
        server = request.getfixturevalue("server")
        code = DOC_PORT.sub(server.url.removeprefix("http://"), code)
    if block.lang == "bash":
        if re.search(r"\bcurl\b", code) and shutil.which("curl") is None:
            pytest.skip("curl is not installed")
        cmd = ["bash", "-euo", "pipefail", "-c", CURL_WRAPPER + code]
    else:
        cmd = [sys.executable, "-c", code]
    bin_dir = os.path.dirname(sys.executable)  # `torchrun` and `python` of this venv
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=BLOCK_TIMEOUT, text=True, start_new_session=True)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{block.name} ({block.lang}) ran past {BLOCK_TIMEOUT:.0f} s:\n{block.code}\n"
                    f"--- output ---\n{(e.output or '')[-4000:]}")
    if proc.returncode != 0:
        pytest.fail(f"{block.name} ({block.lang}) exited {proc.returncode}:\n{block.code}\n"
                    f"--- output ---\n{proc.stdout[-4000:]}")


# --- docs/models.md lists exactly the families the tests cover -------------------------------------------

# family (as the table names it, without the parenthesis) -> the test files that compare it with its reference
TESTED_FAMILIES = {
    "Mistral / Llama": {"tests/test_models.py"},
    "Qwen2": {"tests/test_models.py"},
    "Qwen3": {"tests/test_models.py"},
    "BERT": {"tests/test_models.py", "tests/test_minilm.py"},
    "XLM-RoBERTa": {"tests/test_models.py", "tests/test_bge_m3.py"},
    "CLIP": {"tests/test_clip.py", "tests/test_server_images.py"},
    "Qwen2-VL": {"tests/test_gme.py", "tests/test_server_images.py"},
    "BERT cross-encoder / classifier": {"tests/test_rerank.py", "tests/test_server_rerank.py"},
    "XLM-RoBERTa cross-encoder / classifier": {"tests/test_rerank.py"},
    "Decoder reranker / classifier": {"tests/test_rerank.py", "tests/test_server_rerank.py"},
    "MPNet": {"tests/test_mpnet.py"},
    "ModernBERT": {"tests/test_modernbert.py"},
    "Gemma 2": {"tests/test_gemma.py"},
    "Gemma 3 text": {"tests/test_gemma.py"},
    "SPLADE": {"tests/test_splade.py"},
}


def family_table(path: Path) -> list[dict[str, str]]:
    """Rows of the first Markdown table whose header starts with `family`, keyed by header."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next(i for i, ln in enumerate(lines) if re.match(r"^\|\s*family\s*\|", ln))
    header = [c.strip() for c in lines[start].strip().strip("|").split("|")]
    rows = []
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", ln.strip().strip("|"))]
        assert len(cells) == len(header), f"{path.name}: row of {len(cells)} cells under {len(header)}: {ln}"
        rows.append(dict(zip(header, cells)))
    return rows


def family_name(cell: str) -> str:
    return re.sub(r"\s*\(.*\)\s*$", "", cell).strip()


def test_models_md_lists_the_tested_families():
    rows = family_table(Path(REPO, "docs", "models.md"))
    assert {family_name(r["family"]) for r in rows} == set(TESTED_FAMILIES)
    documented_archs = set()
    for row in rows:
        family = family_name(row["family"])
        named = set(re.findall(r"tests/\w+\.py", row["test"]))
        assert named == TESTED_FAMILIES[family], f"{family}: the test column names {named}"
        for f in named:
            assert Path(REPO, f).is_file(), f"{family}: {f} does not exist"
        # every test case or function the cell names in backticks exists in those tests or the tiny
        # checkpoints they build
        sources = "".join(Path(REPO, f).read_text()
                          for f in named | {"tests/tiny_models.py", "tests/tiny_clip.py", "tests/tiny_rerankers.py",
                                            "tests/tiny_mpnet.py", "tests/tiny_modernbert.py", "tests/tiny_gemma.py",
                                            "tests/tiny_m3.py", "tests/tiny_splade.py"})
        for ident in re.findall(r"`([a-z_][a-z0-9_]*)`", row["test"]):
            assert ident in sources, f"{family}: `{ident}` is named in docs/models.md but in none of {sorted(named)}"
        documented_archs |= set(re.findall(r"`([A-Z]\w+)`", row["architectures in config.json"]))
    served = set(ARCHITECTURES) | set(SPARSE_ARCHITECTURES)
    assert documented_archs == served, (
        f"in tp_embed/models' ARCHITECTURES, not in docs/models.md: {sorted(served - documented_archs)}; "
        f"in docs/models.md, not served: {sorted(documented_archs - served)}")


def test_readme_lists_the_same_families():
    readme = family_table(Path(REPO, "README.md"))
    assert {family_name(r["family"]) for r in readme} == set(TESTED_FAMILIES)
    for row in readme:
        named = set(re.findall(r"tests/\w+\.py", row["test"]))
        assert named and named <= TESTED_FAMILIES[family_name(row["family"])], row

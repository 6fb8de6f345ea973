"""The commands in README.md and docs/*.md stay true: every `python SCRIPT.py ...` or
`torchrun ... SCRIPT.py ...` names a script in the repository root whose --help lists every
--flag used with it, and every `make TARGET` names a target of the Makefile.

Commands are read from ```bash blocks (lines continued with a trailing backslash joined, `#`
comments dropped) and from inline code spans that start with python, torchrun or make. A failure
names the file, the line and the command. Each script's --help is read once."""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OPERATORS = {"&&", "||", ";", "|", "&", "(", ")"}
ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
FLAG = re.compile(r"--[A-Za-z0-9][A-Za-z0-9_-]*")
INLINE = re.compile(r"(?<!`)`((?:[A-Za-z_][A-Za-z0-9_]*=\S+ )*(?:python3?|torchrun|make) [^`]+)`(?!`)")


def command_lines(text):
    """(line number, command line) for each command in `text`'s ```bash blocks and inline spans:
    continued lines joined, numbered by their first line."""
    found, in_bash, pending, start = [], False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        fence = line.strip()
        if fence.startswith("```"):
            in_bash = not in_bash and fence[3:].strip() in ("bash", "sh", "shell", "console")
            pending = ""
            continue
        if in_bash:
            if not pending:
                start = number
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            found.append((start, pending + line))
            pending = ""
        else:
            found.extend((number, match.group(1)) for match in INLINE.finditer(line))
    return found


def split_commands(line):
    """The simple commands of a shell line, each as a list of words, comments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands, words = [], []
    for token in lexer:
        if token in OPERATORS or set(token) <= set("<>&|;"):
            commands.append(words)
            words = []
        else:
            words.append(token)
    commands.append(words)
    return [words for words in commands if words]


def parse(words):
    """('python', script, flags) or ('make', targets) or None for one simple command."""
    while words and ENV_ASSIGNMENT.match(words[0]):
        words = words[1:]
    if not words:
        return None
    program = Path(words[0]).name
    if re.fullmatch(r"python[0-9.]*", program):
        if len(words) < 2 or words[1] in ("-m", "-c") or not words[1].endswith(".py"):
            return None
        script, rest = words[1], words[2:]
    elif program == "torchrun":
        scripts = [i for i, word in enumerate(words) if word.endswith(".py")]
        if not scripts:
            return ("python", None, [])
        script, rest = words[scripts[0]], words[scripts[0] + 1:]
    elif program == "make":
        return ("make", [word for word in words[1:] if not word.startswith("-") and "=" not in word])
    else:
        return None
    flags = sorted({flag for word in rest for flag in FLAG.findall(word.split("=", 1)[0])})
    return ("python", script, flags)


def commands(path, root=ROOT):
    """(where, command line, parsed command) for every python/torchrun/make command in `path`,
    where being the path from `root` and the line."""
    out = []
    for number, line in command_lines(path.read_text()):
        for words in split_commands(line):
            parsed = parse(words)
            if parsed:
                out.append((f"{path.relative_to(root)}:{number}", line.strip(), parsed))
    return out


def makefile_targets(makefile):
    """The Makefile's explicit targets, its simple variables expanded."""
    text = makefile.read_text()
    variables = dict(re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)\s*[:?]?=\s*(.*?)\s*$", text, re.M))

    def expand(s):
        for _ in range(5):
            s = re.sub(r"\$[({]([A-Za-z0-9_]+)[)}]", lambda m: variables.get(m.group(1), ""), s)
        return s

    targets = set()
    for names in re.findall(r"^([^\s#=:][^:=]*?):(?![:=])", text, re.M):
        targets.update(expand(names).split())
    return targets - {".PHONY"}


def problems(found, help_of, targets):
    """One line per false command: the script missing, a flag its --help lacks, a make target
    the Makefile lacks."""
    out = []
    for where, line, parsed in found:
        if parsed[0] == "make":
            out += [f"{where}: `{line}`: make target {t!r} is not in the Makefile"
                    for t in parsed[1] if t not in targets]
            continue
        _, script, flags = parsed
        if script is None or script not in help_of:
            out.append(f"{where}: `{line}`: script {script!r} is not in the repository root")
            continue
        text = help_of[script]
        out += [f"{where}: `{line}`: {flag} is not in `python {script} --help`"
                for flag in flags if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text)]
    return out


# Runs each script as `python SCRIPT --help` would (runpy, as __main__, argv [SCRIPT, --help]), all
# in one child process: torch is imported once instead of once per script (5 s against 25 s).
HELP_CHILD = """
import contextlib, io, json, runpy, sys, traceback
out_file, scripts = sys.argv[1], sys.argv[2:]
result = {}
for script in scripts:
    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    sys.argv = [script, "--help"]
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
        except BaseException:
            code = 1
            traceback.print_exc()
    result[script] = [code, stdout.getvalue(), stderr.getvalue()]
with open(out_file, "w") as f:
    json.dump(result, f)
"""


@pytest.fixture(scope="module")
def found():
    return {path.name: commands(path) for path in DOCUMENTS}


@pytest.fixture(scope="module")
def help_of(found, tmp_path_factory):
    """`python SCRIPT --help`'s output for every root script the documents name."""
    scripts = sorted({parsed[1] for cmds in found.values() for _, _, parsed in cmds
                      if parsed[0] == "python" and parsed[1] and "/" not in parsed[1]
                      and (ROOT / parsed[1]).is_file()})
    out_file = tmp_path_factory.mktemp("help") / "help.json"
    child = subprocess.run([sys.executable, "-c", HELP_CHILD, str(out_file), *scripts], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    result = json.loads(out_file.read_text())
    failed = [f"python {s} --help: exit status {code}\n{err[-1000:]}"
              for s, (code, _, err) in result.items() if code != 0]
    assert not failed, "\n".join(failed)
    return {script: out for script, (_, out, _) in result.items()}


def test_the_readme_has_its_commands(found):
    """The extraction finds the README's commands (so the test below cannot pass on nothing)."""
    readme = found["README.md"]
    scripts = {parsed[1] for _, _, parsed in readme if parsed[0] == "python"}
    assert {"create_data_lists.py", "train.py", "eval.py", "detect.py", "export.py"} <= scripts
    assert any(parsed[0] == "python" and "--scale-lr" in parsed[2] for _, _, parsed in readme), \
        "the continued torchrun line was not joined"
    made = {t for _, _, parsed in readme if parsed[0] == "make" for t in parsed[1]}
    assert {"quickstart", "test"} <= made


@pytest.mark.parametrize("name", [path.name for path in DOCUMENTS])
def test_commands_name_real_scripts_flags_and_targets(name, found, help_of):
    bad = problems(found[name], help_of, makefile_targets(ROOT / "Makefile"))
    assert not bad, "\n" + "\n".join(bad)


def test_a_false_command_is_caught(tmp_path):
    """The checker itself: a made-up flag, a missing script and a missing target are reported,
    with their line; comments and continued lines are handled."""
    doc = tmp_path / "x.md"
    doc.write_text("text\n```bash\npython train.py --out a   # --not-checked\n"
                   "torchrun --nproc_per_node=2 \\\n    train.py --bogus-flag 1 --out=b\n"
                   "python nowhere.py --x\nmake quickstart && make nonsense\n```\n"
                   "and `python train.py --lr 1 --typo-flag` inline\n")
    found = commands(doc, root=tmp_path)
    help_of = {"train.py": "usage: train.py [--out OUT] [--lr LR]"}
    bad = problems(found, help_of, {"quickstart", "test"})
    assert len(bad) == 4, bad
    assert bad[0].startswith("x.md:4: ") and "--bogus-flag is not in `python train.py --help`" in bad[0]
    assert bad[1].startswith("x.md:6: ") and "'nowhere.py' is not in the repository root" in bad[1]
    assert bad[2].startswith("x.md:7: ") and "make target 'nonsense'" in bad[2]
    assert bad[3].startswith("x.md:9: ") and "--typo-flag" in bad[3]

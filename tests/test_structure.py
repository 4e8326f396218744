"""The house rules, checked: no function over 60 lines, no logic written twice, no comment that points outside the
repository, and a light public API (``import rayanom`` loads neither torch nor Ray)."""

import ast
import collections
import io
import keyword
import os
import pathlib
import re
import subprocess
import sys
import tokenize

REPO = pathlib.Path(__file__).resolve().parent.parent
SOURCES = sorted([*REPO.glob("rayanom/*.py"), *REPO.glob("jobs/*.py")])
MAX_LINES = 60
WINDOW = 6  # lines of the same shape that count as logic written twice
TWIN = "deliberate twin"  # a comment with these words, in a window, allows it (a test's independent reference...)


def test_no_function_over_60_lines():
    long = [f"{p.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for p in SOURCES for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_LINES]
    assert not long, long


def _shapes(path: pathlib.Path) -> list[tuple[int, str, bool]]:
    """(line, shape, marked) per logical source line: names as x, strings as S, numbers as N; imports, docstrings
    and annotated fields (dataclass declarations) left out."""
    lines: dict[int, list[str]] = {}
    marked: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type == tokenize.COMMENT and TWIN in tok.string:
            marked.add(tok.start[0])
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                        tokenize.ENCODING, tokenize.ENDMARKER):
            continue
        shape = {tokenize.STRING: "S", tokenize.NUMBER: "N"}.get(tok.type, tok.string)
        if tok.type == tokenize.NAME and not keyword.iskeyword(tok.string):
            shape = "x"
        lines.setdefault(tok.start[0], []).append(shape)
    return [(n, " ".join(v), n in marked) for n, v in sorted(lines.items())
            if v[0] not in ("import", "from") and v != ["S"] and v[:2] != ["x", ":"]]


def test_no_logic_written_twice():
    seen = collections.defaultdict(list)
    for p in SOURCES:
        shapes = _shapes(p)
        for i in range(len(shapes) - WINDOW + 1):
            window = shapes[i:i + WINDOW]
            if sum(len(s) for _, s, _ in window) >= 60 and not any(m for _, _, m in window):
                seen[tuple(s for _, s, _ in window)].append((str(p.relative_to(REPO)), window[0][0]))
    twice = []
    for places in seen.values():
        apart = [b for a, b in zip(places, places[1:]) if a[0] != b[0] or b[1] - a[1] >= WINDOW]
        if apart:  # not a run of one repeated line shape (a table of checks) overlapping itself
            twice.append(places)
    assert not twice, twice


def test_no_comment_points_outside_the_repository():
    # The reference documents and their section codes (P16, B 7.1, A4-A6), not GPU names such as A100.
    pattern = re.compile(r"models\.md|ray\.md|\bP\d+[a-z]?\b|\bB \d+(\.\d+)?\b|\bA\d{1,2}(-A\d+)?\b")
    found = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in [*SOURCES, REPO / "README.md"]
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, found


def test_public_api_is_light_and_complete():
    # After every module is loaded, no name of the API may be shadowed by a submodule of the same name.
    code = ("import sys, types, rayanom; assert 'torch' not in sys.modules and 'ray' not in sys.modules, 'heavy'; "
            "import rayanom.pipeline, rayanom.report, rayanom.compare, rayanom.pixels, rayanom.workflows; "
            "print([n for n in rayanom.__all__ "
            "       if isinstance(getattr(rayanom, n, None), (type(None), types.ModuleType))])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr[-2000:]
    import rayanom

    for name in ("fit", "score", "Artifact", "DfkdeConfig", "DfmConfig", "RkdeConfig", "RunConfig", "UserError"):
        assert name in rayanom.__all__


def test_jobs_run_as_scripts_modules_and_console_scripts(tmp_path):
    """The parsers import in tests; `python jobs/NAME.py`, `python -m jobs.NAME` and the installed `rayanom-NAME` all
    reach the same job (a bad flag value is refused by each the same way)."""
    from rayanom_jobs import compare, decide, fit, index, score

    for job in (compare, decide, fit, index, score):
        assert "usage:" in job.get_args_parser().format_help()  # importable, buildable
    bin_dir = pathlib.Path(sys.executable).parent
    args = ["--before", str(tmp_path), "--after", str(tmp_path), "--out", str(tmp_path / "o"), "--top", "-1"]
    for cmd in ([sys.executable, "jobs/compare.py"], [sys.executable, "-m", "jobs.compare"],
                [str(bin_dir / "rayanom-compare")]):
        proc = subprocess.run([*cmd, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "invalid --top=-1" in proc.stderr, (cmd, proc.stderr[-2000:])


def test_every_default_is_the_dataclasses():
    """Every config field has a flag whose help shows the dataclass's default (per model where they differ), and
    the run flags default to RunConfig's: the defaults are written once, in rayanom.config."""
    import dataclasses

    from rayanom.config import RunConfig
    from rayanom.models import SPECS
    from rayanom_jobs import fit

    actions = {a.dest: a for a in fit.get_args_parser()._actions}
    flags = fit.model_flags()
    for model, spec in SPECS.items():
        for f in dataclasses.fields(spec.config):
            if not f.init:
                continue
            action = actions[fit.dest_of(f)]  # the field's name, or the flag it joins (DFM's layer: --layers)
            shown = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else str(f.default)
            assert action.default is None and shown in action.help, (model, f.name, action.help)
            assert model in flags[fit.dest_of(f)][0]
    run_flags = {"batch_size": "batch_size", "rows_per_part": "rows_per_part", "io_retries": "io_retries",
                 "max_file_bytes": "max_file_bytes", "no_progress_timeout": "no_progress_s",
                 "wait_for_actors": "start_timeout_s"}
    for dest, field in run_flags.items():
        assert actions[dest].default == getattr(RunConfig(), field), dest


def test_only_the_model_table_names_a_model():
    """The model choice is made in rayanom/models.py (the table), rayanom/config.py (the configs it lists) and each
    model's own stage (heads, regions, features); the orchestration, the artifact, the report and the jobs name no
    model: no string literal equal to a model's name."""
    from rayanom.models import SPECS

    own = {"models.py", "config.py", "heads.py", "regions.py", "features.py"}
    found = []
    for p in SOURCES:
        if p.name in own:
            continue
        for tok in tokenize.generate_tokens(io.StringIO(p.read_text()).readline):
            if tok.type == tokenize.STRING and not tok.string.lstrip("rbRB").startswith(("f", "F")):
                try:
                    value = ast.literal_eval(tok.string)
                except (ValueError, SyntaxError):
                    continue
                if value in SPECS:
                    found.append(f"{p.relative_to(REPO)}:{tok.start[0]}: {tok.string}")
    assert not found, found

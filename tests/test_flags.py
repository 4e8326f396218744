"""The jobs' flags: renamed flags and their deprecated spellings, one report location rule, messages that name flags,
and user errors that exit 2 with one line."""

import logging
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPRECATED = "is deprecated and will be removed in the next release: use"
COMPARE_ARGS = ["--before", "a", "--after", "b", "--out", "o"]  # compare.py's required flags (its main is replaced)


def _parse(job, argv, caplog):
    """``job``'s flags parsed from ``argv``, and the deprecation warnings logged meanwhile."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rayanom.jobs"):
        args = job.get_args_parser().parse_args(argv)
    return args, [r.getMessage() for r in caplog.records if DEPRECATED in r.getMessage()]


@pytest.mark.parametrize("name", ["score", "decide"])
def test_model_dir_and_its_old_spelling(name, caplog):
    import importlib

    job = importlib.import_module(f"rayanom_jobs.{name}")
    rest = ["--index", "i.parquet", "--out", "o"] if name == "score" else ["--scores", "s", "--threshold", "1"]
    args, warned = _parse(job, ["--model-dir", "runs/r1/model", *rest], caplog)
    assert args.model_dir == "runs/r1/model" and not hasattr(args, "model") and warned == []
    args, warned = _parse(job, ["--model", "runs/r1/model", *rest], caplog)
    assert args.model_dir == "runs/r1/model"
    assert warned == [f"--model {DEPRECATED} --model-dir"]


def test_fit_keeps_model_as_the_model_type():
    from rayanom_jobs import fit

    actions = {a.dest: a for a in fit.get_args_parser()._actions}
    assert actions["model"].option_strings == ["--model"] and "dfm" in actions["model"].choices
    assert "model_dir" not in actions


def test_layers_for_dfkde_and_dfm_and_the_old_layer(caplog):
    from rayanom.config import UserError, config_to_dict
    from rayanom_jobs import fit

    args, warned = _parse(fit, ["--model", "dfm", "--layers", "layer2"], caplog)
    config = fit.build_config(args)
    assert config.layer == "layer2" and warned == []
    assert "layer" in config_to_dict(config) and "layers" not in config_to_dict(config)  # the stored field name
    args, warned = _parse(fit, ["--model", "dfm", "--layer", "layer2"], caplog)
    assert fit.build_config(args) == config and warned == [f"--layer {DEPRECATED} --layers"]
    args, _ = _parse(fit, ["--model", "dfkde", "--layers", "layer2", "layer3"], caplog)
    assert fit.build_config(args).layers == ("layer2", "layer3")
    args, _ = _parse(fit, ["--model", "dfm", "--layers", "layer2", "layer3"], caplog)
    with pytest.raises(UserError, match=r"invalid --layers=\['layer2', 'layer3'\]: --model dfm takes exactly one"):
        fit.build_config(args)
    args, _ = _parse(fit, ["--model", "rkde", "--layers", "layer2"], caplog)
    with pytest.raises(UserError, match="invalid --layers: it applies to --model dfkde or dfm, not rkde"):
        fit.build_config(args)


def test_compare_before_after_names_and_the_old_a_b(caplog):
    from rayanom_jobs import compare

    args, warned = _parse(compare, ["--before", "r1", "--after", "r2", "--names", "june", "july", "--out", "o"],
                          caplog)
    assert (args.before, args.after, args.names, warned) == ("r1", "r2", ["june", "july"], [])
    args, warned = _parse(compare, ["--a", "r1", "--b", "r2", "--out", "o"], caplog)
    assert (args.before, args.after, args.names) == ("r1", "r2", ["before", "after"])
    assert warned == [f"--a {DEPRECATED} --before", f"--b {DEPRECATED} --after"]


def test_one_report_location_rule():
    from rayanom.report import report_dir_of
    from rayanom_jobs import decide, fit, score

    assert report_dir_of("runs/r1/scores") == "runs/r1/scores-report"
    assert report_dir_of("s3://b/r1/scores/") == "s3://b/r1/scores-report"
    assert "report (written to OUT/scores-report)" in fit.get_args_parser().format_help()
    assert "report (written to OUT-report)" in score.get_args_parser().format_help()
    assert "write SCORES-report" in decide.get_args_parser().format_help()
    fit_help = fit.get_args_parser().format_help()
    assert "speed only" not in fit_help and "--precision is also part of the model's identity" in fit_help


def _printed(job, message: str, argv: list[str], monkeypatch, capsys) -> str:
    """The line ``job``'s command line (its ``cli``) prints, exit code 2, where its ``main`` raises UserError
    ``message``."""
    from rayanom.config import UserError

    def main(args):
        raise UserError(message)

    monkeypatch.setattr(job, "main", main)
    monkeypatch.setattr(sys, "argv", ["job", *argv])
    with pytest.raises(SystemExit) as e:
        job.cli()
    assert e.value.code == 2
    return capsys.readouterr().err.removeprefix("error: ").removesuffix("\n")


def test_messages_name_flags(monkeypatch, capsys):
    from rayanom_jobs import compare, fit, score

    def named(message):
        return _printed(fit, message, ["--model", "dfkde"], monkeypatch, capsys)

    assert named("invalid batch_size=0: expected an integer >= 1") == "invalid --batch-size=0: expected an integer >= 1"
    assert named("invalid no_progress_s=0 and start_timeout_s=-1") == \
        "invalid --no-progress-timeout=0 and --wait-for-actors=-1"
    assert named("invalid layer='' (max_training_points=3 > n_pca_components=4)") == \
        "invalid --layers='' (--max-training-points=3 > --n-pca-components=4)"
    assert named("invalid model='runs/r/model'") == "invalid model='runs/r/model'"  # not --model
    assert named("got 3 rows; lower n_pca_components or seed") == \
        "got 3 rows; lower --n-pca-components or seed"  # a bare snake_case name too, not a plain word
    assert named("cannot read /d/image_size/a.png, image_size.png") == \
        "cannot read /d/image_size/a.png, image_size.png"  # never in a path or a file name
    assert _printed(score, "invalid model='m': not a readable rayanom artifact",
                    ["--model-dir", "m", "--index", "i", "--out", "o"], monkeypatch, capsys) == \
        "invalid --model-dir='m': not a readable rayanom artifact"
    assert _printed(compare, "invalid top=-1", COMPARE_ARGS, monkeypatch, capsys) == "invalid --top=-1"


def _job(*argv):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "error: invalid --batch-size=0: expected an integer >= 1"),
    (["--no-progress-timeout", "0"], "error: invalid --no-progress-timeout=0.0: expected seconds > 0"),
    (["--model", "dfm", "--layers", "layer2", "layer3"],
     "error: invalid --layers=['layer2', 'layer3']: --model dfm takes exactly one value"),
    (["--model", "dfkde", "--n-pca-components", "0"],
     "error: invalid --n-pca-components=0: expected an integer >= 1"),
    (["--model", "nope"], "error: argument --model: invalid choice: 'nope'"),
    (["--index", "INDEX"], "error: missing --out RUN_DIR: it is required with --index"),
])
def test_a_user_error_exits_2_with_one_line(demo_set, tmp_path, args, message):
    """Cheap cases, refused before Ray starts: one line on stderr, naming the flag, no traceback, nothing written."""
    base = ["--model", "dfkde"] if "--model" not in args else []
    out = [] if "INDEX" in args else ["--out", str(tmp_path / "r")]
    argv = [demo_set["index"] if a == "INDEX" else a for a in args]
    proc = _job("jobs/fit.py", *base, "--index", demo_set["index"], *out, "--backbone", "resnet18",
                "--no-pretrained", "--quiet", *argv) if "INDEX" not in args else _job("jobs/fit.py", *base, *argv)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert _not_logged(proc.stderr) == [_not_logged(proc.stderr)[0]] and _not_logged(proc.stderr)[0].startswith(
        message), proc.stderr
    assert not os.path.exists(tmp_path / "r")


def _not_logged(stderr: str) -> list[str]:
    """The lines of ``stderr`` that are not log records (a warning about random weights...)."""
    return [line for line in stderr.splitlines() if line and not re.match(r"\d\d:\d\d:\d\d [A-Z]+ ", line)]


def test_a_deprecated_spelling_still_runs_the_job(tmp_path):
    proc = _job("jobs/score.py", "--model", str(tmp_path / "nothing"), "--index", "i.parquet", "--out",
                str(tmp_path / "o"), "--quiet")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = _not_logged(proc.stderr)
    assert lines[0] == f"--model {DEPRECATED} --model-dir", lines
    assert len(lines) == 2 and lines[1].startswith(f"error: invalid --model-dir={str(tmp_path / 'nothing')!r}: ")


@pytest.mark.parametrize("raised, code", [
    (RuntimeError("no BankFeatures actor (1 CPU, 1 GPU) could start in 600 s of waiting: the cluster has no room for "
                  "one. Raise --wait-for-actors while its autoscaler is still starting nodes"), 2),
    (RuntimeError("no node could run a task with an actor's resources (1 CPU, 1 GPU) in 600 s (--wait-for-actors)"), 2),
    (RuntimeError("no progress for 1800 s: 2 of 2 PartScorer actors (raise --no-progress-timeout if ...)"), 2),
    (RuntimeError("an internal failure"), 1),
])
def test_a_timeout_on_the_cluster_exits_2_with_one_line(monkeypatch, capsys, raised, code):
    from rayanom_jobs import compare

    def main(args):
        raise raised

    monkeypatch.setattr(compare, "main", main)
    monkeypatch.setattr(sys, "argv", ["job", *COMPARE_ARGS])
    with pytest.raises(SystemExit) as e:
        compare.cli()
    err = capsys.readouterr().err
    assert e.value.code == code
    if code == 2:
        assert err == f"error: {raised}\n"
    else:
        assert "Traceback" in err and "an internal failure" in err


def test_ray_get_timeout_exits_2(monkeypatch, capsys):
    import ray

    from rayanom_jobs import compare

    def main(args):
        raise ray.exceptions.GetTimeoutError("Get timed out: some object(s) not ready.")

    monkeypatch.setattr(compare, "main", main)
    monkeypatch.setattr(sys, "argv", ["job", *COMPARE_ARGS])
    with pytest.raises(SystemExit) as e:
        compare.cli()
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1

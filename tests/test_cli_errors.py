"""The CLI's rough edges (issue 11): every bad value is one error line naming it and the fix, exit status 2,
before any work starts; unexpected errors are one line too (exit 1, ``--debug`` shows the traceback);
Ctrl-C says how to continue (the exact command with ``--resume``) or where partial results are;
results.json records the full command line; without matplotlib nothing claims a PNG."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
import torch

from deftly import cli
from deftly.bench import suite as bench_suite
from deftly.data import MissingDataError


def _run(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def _need_fashion():
    from deftly.data import fashion_mnist

    try:
        fashion_mnist.load("test", limit=1)
    except MissingDataError as err:
        pytest.skip(str(err))


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# (argv, substrings the one error line must hold)
BAD = {
    "train-misspelt-structure": (["train", "fashion-mnist", "--structures", "dense,monarh"],
                                 ["unknown structure 'monarh'", "Did you mean 'monarch'?"]),
    "train-empty-name": (["train", "fashion-mnist", "--structures", "dense,,monarch"],
                         ["--structures", "empty structure name", "dense,monarch"]),
    "train-trailing-comma": (["train", "fashion-mnist", "--structures", "dense,"], ["empty structure name"]),
    "train-repeated-name": (["train", "fashion-mnist", "--structures", "dense,lowrank,dense"],
                            ["'dense' more than once"]),
    "train-batch-size-0": (["train", "fashion-mnist", "--batch-size", "0"], ["batch_size=0", "--batch-size N", ">= 1"]),
    "train-train-limit-0": (["train", "fashion-mnist", "--train-limit", "0"], ["train_limit=0", "--train-limit N"]),
    "train-test-limit-neg": (["train", "fashion-mnist", "--test-limit", "-5"], ["test_limit=-5"]),
    "train-threads-0": (["train", "fashion-mnist", "--threads", "0"], ["threads=0", "--threads N"]),
    "train-lr-negative": (["train", "fashion-mnist", "--lr", "-1"], ["lr=-1"]),
    "train-epochs-0": (["train", "fashion-mnist", "--epochs", "0"], ["epochs=0"]),
    "charlm-misspelt": (["train", "charlm", "--structures", "dense,blockdiagg"], ["Did you mean 'blockdiag'?"]),
    "charlm-heads-0": (["train", "charlm", "--heads", "0"], ["heads=0"]),
    "charlm-batch-size-0": (["train", "charlm", "--batch-size", "0"], ["batch_size=0"]),
    "charlm-ctx-0": (["train", "charlm", "--ctx", "0"], ["ctx=0"]),
    "charlm-warmup-neg": (["train", "charlm", "--warmup", "-1"], ["warmup=-1"]),
    "demo-misspelt": (["demo", "--structures", "monarh"], ["Did you mean 'monarch'?"]),
    "demo-empty-name": (["demo", "--structures", ",lowrank"], ["empty structure name"]),
    "demo-train-limit-0": (["demo", "--train-limit", "0"], ["train_limit=0"]),
    "demo-threads-0": (["demo", "--threads", "0"], ["threads=0"]),
    "compress-misspelt": (["compress", "minilm", "--structure", "lowrnk"], ["Did you mean 'lowrank'?"]),
    "compress-batch-size-0": (["compress", "minilm", "--batch-size", "0"], ["batch_size=0"]),
    "compress-threads-0": (["compress", "minilm", "--threads", "0"], ["threads=0"]),
    "bench-threads-0": (["bench", "--threads", "0"], ["--threads 0", ">= 1"]),
    "bench-batches-0": (["bench", "--batches", "4", "0"], ["--batches 4 0"]),
    "bench-misspelt": (["bench", "--structures", "monarh"], ["Did you mean 'monarch'?"]),
    "bench-min-run-time": (["bench", "--min-run-time", "0"], ["--min-run-time 0"]),
    "show-misspelt": (["show", "--structures", "monarh", "--png", ""], ["Did you mean 'monarch'?"]),
    "show-picture-size": (["show", "--structures", "dense", "--picture-size", "0"], ["--picture-size 0"]),
    # names argparse itself refuses: the closest valid one is suggested too
    "train-misspelt-recipe": (["train", "fashion-mnsit"], ["invalid choice: 'fashion-mnsit'",
                                                            "Did you mean 'fashion-mnist'?"]),
    "compress-misspelt-model": (["compress", "minlm", "--structure", "lowrank"], ["invalid choice: 'minlm'",
                                                                                   "Did you mean 'minilm'?"]),
    "train-misspelt-option": (["train", "fashion-mnist", "--strucures", "dense"],
                              ["unrecognized arguments: --strucures dense", "Did you mean '--structures'?"]),
    "charlm-misspelt-option": (["train", "charlm", "--strucures=dense"], ["--strucures=dense",
                                                                          "Did you mean '--structures'?"]),
    "train-misspelt-choice": (["train", "fashion-mnist", "--model", "mpl"], ["invalid choice: 'mpl'",
                                                                             "Did you mean 'mlp'?"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_value_is_one_line_before_any_work(case, capsys, monkeypatch, tmp_path):
    argv, wants = BAD[case]
    # no command may get as far as loading data, training or measuring: those raise here
    from deftly.data import fashion_mnist, wikipedia

    def no_work(*a, **k):
        raise AssertionError(f"{argv}: work started before the bad value was refused")

    monkeypatch.setattr(fashion_mnist, "tensors", no_work)
    monkeypatch.setattr(wikipedia, "char_splits", no_work)
    monkeypatch.setattr(bench_suite, "measure_pair", no_work)
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (case, code, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"deftly {argv[0]}") and "error:" in lines[0], lines
    for want in wants:
        assert want in lines[0], (want, lines[0])
    assert not any(tmp_path.iterdir()), "a refused command wrote files"


def test_misspelt_command_and_options_suggest_the_closest(capsys):
    def one_line(argv):
        code, _, err = _run(argv, capsys)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, (argv, code, err)
        return lines[0]

    line = one_line(["trian"])
    assert line.startswith("deftly: error:") and "invalid choice: 'trian'" in line, line
    assert "Did you mean 'train'?" in line, line
    line = one_line(["xyzzy"])  # nothing close: no suggestion, the choices are listed
    assert "invalid choice: 'xyzzy'" in line and "Did you mean" not in line and "'train'" in line, line
    line = one_line(["train", "fashion-mnist", "--strucures", "dense", "--epohcs", "1"])
    assert line.startswith("deftly train fashion-mnist: error: unrecognized arguments:"), line
    assert "Did you mean '--structures' for '--strucures', '--epochs' for '--epohcs'?" in line, line
    line = one_line(["train", "fashion-mnist", "--zzzzzz"])  # nothing close: named, no suggestion
    assert "unrecognized arguments: --zzzzzz" in line and "Did you mean" not in line, line


def test_python_api_refuses_the_same_values():
    from deftly.train.charlm import CharLMConfig
    from deftly.train.fashion import FashionConfig

    with pytest.raises(ValueError, match=r"unknown structure 'monarh'.*Did you mean 'monarch'\?"):
        FashionConfig(structures=("dense", "monarh"))
    with pytest.raises(TypeError, match="sequence of structure names"):
        FashionConfig(structures="dense")
    for bad in ({"batch_size": 0}, {"train_limit": 0}, {"threads": 0}, {"epochs": 1.5}, {"lr": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FashionConfig(**bad)
    for bad in ({"heads": 0}, {"ctx": -1}, {"eval_windows": 0}, {"text_limit": 0}, {"warmup": -2}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            CharLMConfig(**bad)
    with pytest.raises(ValueError, match=r"Did you mean 'lowrank'\?"):
        CharLMConfig(structures=("dense", "lowrnk"))
    assert FashionConfig(train_limit=None, threads=None).structures[0] == "dense"  # None: unset, fine
    import deftly  # hyperparameter names too: the closest one is suggested

    with pytest.raises(ValueError, match=r"no parameter 'nblock'.*Did you mean 'nblocks'\?"):
        deftly.make("blockdiag", 8, 8, nblock=2)
    with pytest.raises(ValueError, match=r"no hyperparameter 'rnak'.*Did you mean 'rank'\?"):
        deftly.StructureConfig("lowrank", hparams={"rnak": 2})


def test_structure_config_suggests_the_closest_field():
    import dataclasses
    import inspect

    import deftly

    with pytest.raises(TypeError, match=r"unexpected keyword argument 'budjet'\. Did you mean 'budget'\? "
                                        r"Its fields are: structure, target_modules, .*budget"):
        deftly.StructureConfig("lowrank", budjet=0.5)
    with pytest.raises(TypeError, match=r"arguments 'budjet', 'zzz'\. Did you mean 'budget'\?"):
        deftly.StructureConfig(structure="lowrank", budjet=0.5, zzz=1)
    cfg = deftly.StructureConfig("lowrank", budget=0.5)  # the dataclass machinery is unchanged
    assert dataclasses.replace(cfg, budget=0.25).budget == 0.25
    with pytest.raises(TypeError, match=r"Did you mean 'budget'\?"):
        dataclasses.replace(cfg, budjet=0.25)
    assert [f.name for f in dataclasses.fields(cfg)][:4] == ["structure", "target_modules", "exclude_modules",
                                                               "budget"]
    assert "budget" in inspect.signature(deftly.StructureConfig).parameters
    with pytest.raises(ValueError, match="budget=2"):  # still validated
        deftly.StructureConfig("lowrank", budget=2)


# ------------------------------------------------------------------ unexpected errors
@pytest.mark.parametrize(("exc", "code", "wants"), [
    (RuntimeError("boom\nsecond line"), 1, ["unexpected RuntimeError: boom second line", "--debug"]),
    (ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib"), 2, ["pip install matplotlib"]),
    # deftly's own modules failing to import are a bug or a broken install, not a package to install
    (ImportError("cannot import name 'match_layers' from 'deftly.surgery.structurize'",
                 name="deftly.surgery.structurize"), 1,
     ["internal error: ImportError in module 'deftly.surgery.structurize'", "match_layers", "--debug"]),
    (ModuleNotFoundError("No module named 'deftly.gone'", name="deftly.gone"), 1, ["internal error", "deftly.gone"]),
    (ImportError("cannot import name 'x' from 'torch'", name="torch"), 1, ["internal error", "'torch'"]),
    (PermissionError(13, "Permission denied", "/root/x"), 2, ["Permission denied", "/root/x"]),
    (KeyError("rows"), 2, ["'rows'"]),
])
def test_any_error_is_one_line_and_debug_shows_the_traceback(exc, code, wants, capsys, monkeypatch):
    import deftly.commands.report as report_cmd

    def boom(args):
        raise exc

    monkeypatch.setattr(report_cmd, "run", boom)
    got, _, err = _run(["report", "somewhere"], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert got == code and len(lines) == 1 and lines[0].startswith("deftly report: error:"), err
    for want in wants:
        assert want in lines[0], (want, lines[0])
    assert ("pip install" in lines[0]) == (isinstance(exc, ImportError) and code == 2), lines[0]
    for argv in (["--debug", "report", "somewhere"], ["report", "somewhere", "--debug"]):
        with pytest.raises(type(exc)):
            cli.main(argv)
    monkeypatch.setenv("DEFTLY_DEBUG", "1")
    with pytest.raises(type(exc)):
        cli.main(["report", "somewhere"])


def test_a_broken_import_inside_deftly_is_an_internal_error(capsys, monkeypatch):
    import deftly.commands.report as report_cmd

    def broken(args):
        from deftly.surgery import structurize  # noqa: F401
        from deftly.surgery.structurize import no_such_name  # noqa: F401

    monkeypatch.setattr(report_cmd, "run", broken)
    code, _, err = _run(["report", "somewhere"], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith("deftly report: error: internal error: ImportError in module "
                               "'deftly.surgery.structurize': cannot import name 'no_such_name'"), lines[0]
    assert "pip install" not in lines[0] and "--debug" in lines[0], lines[0]


# ------------------------------------------------------------------ interrupts and the command line
def test_interrupted_demo_names_the_exact_resume_command_and_it_resumes(tmp_path, capsys, monkeypatch):
    """Ctrl-C after the dense model: the message names the exact command with --resume; running it reuses
    the finished dense model (trained once in all) and records that command line in results.json."""
    _need_fashion()
    from deftly.train import fashion

    trained = []
    real_one, real_train = fashion._one, fashion.train

    def one(cfg, structure, *a, **k):
        if structure == "lowrank" and not trained.count("interrupted"):
            trained.append("interrupted")
            raise KeyboardInterrupt
        return real_one(cfg, structure, *a, **k)

    def counting_train(model, *a, **k):
        trained.append(k.get("checkpoint_path").parent.name)
        return real_train(model, *a, **k)

    monkeypatch.setattr(fashion, "_one", one)
    monkeypatch.setattr(fashion, "train", counting_train)
    out = tmp_path / "my demo"  # a space: the command must be shell-quoted to be runnable
    argv = ["demo", "--out", str(out), "--structures", "dense,lowrank", "--epochs", "1", "--width", "32",
            "--train-limit", "512", "--test-limit", "100", "--threads", "1"]
    code, _, err = _run(argv, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 130 and last.startswith("deftly demo: interrupted; "), err
    assert "Fashion-MNIST: 512 training and 100 test images" in err and "[1/2] dense" in err  # progress
    want = "deftly " + shlex.join(argv) + " --resume"
    assert last.endswith(f"continue with: {want}") and f"kept in {out}" in last, last
    assert trained == ["dense", "interrupted"]
    again = shlex.split(last.split("continue with: ", 1)[1])
    assert again[0] == "deftly"
    code, stdout, _ = _run(again[1:], capsys)
    assert code == 0
    assert trained == ["dense", "interrupted", "lowrank"]  # dense reused, not trained again
    data = json.loads((out / "results.json").read_text())
    assert data["command"] == want and data["argv"] == sys.argv
    assert [r["structure"] for r in data["rows"]] == ["dense", "lowrank"]
    last_out = stdout.strip().splitlines()[-1]
    if data["plots"]:
        assert "pareto.png: accuracy vs parameters" in last_out and (out / "pareto.png").exists()


def test_compress_and_train_record_the_full_command_line(monkeypatch, tmp_path):
    from deftly.train import fashion, minilm

    seen = {}
    monkeypatch.setattr(minilm, "run", lambda cfg, out, **k: seen.setdefault("compress", k["command"]) and 1 / 0)
    monkeypatch.setattr(fashion, "run", lambda cfg, out, **k: seen.setdefault("train", k["command"]) and 1 / 0)
    argv = ["compress", "minilm", "--structure", "blockdiag", "--max-steps", "2", "--out", str(tmp_path / "a b")]
    cli.main(argv)
    assert seen["compress"] == "deftly " + shlex.join(argv)
    argv = ["train", "fashion-mnist", "--structures", "dense", "--epochs", "1", "--out", str(tmp_path / "c")]
    cli.main(argv)
    assert seen["train"] == "deftly " + shlex.join(argv)


# ------------------------------------------------------------------ without matplotlib
@pytest.fixture
def no_matplotlib(monkeypatch):
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError


def test_demo_without_matplotlib_says_plots_were_skipped(tmp_path, capsys, no_matplotlib):
    _need_fashion()
    out = tmp_path / "demo"
    code, stdout, _ = _run(["demo", "--out", str(out), "--structures", "dense", "--epochs", "1", "--width", "16",
                            "--train-limit", "256", "--test-limit", "50", "--quiet"], capsys)
    assert code == 0
    last = stdout.strip().splitlines()[-1]
    assert "png" not in last.lower().replace("plots skipped", "")  # no PNG is claimed
    assert last.endswith("plots skipped: matplotlib is not installed (pip install matplotlib, or pip install "
                         "'deftly[plot]')"), last
    assert not list(out.glob("*.png"))
    data = json.loads((out / "results.json").read_text())
    assert data["plots"] == [] and any(n.startswith("plots skipped: matplotlib") for n in data["notes"])
    assert "![" not in (out / "results.md").read_text()


# ------------------------------------------------------------------ deftly bench: estimate, partial results
BENCH = ["bench", "--sizes", "16x16", "--batches", "1", "4", "--structures", "monarch", "lowrank", "--no-fft",
         "--no-memory", "--min-run-time", "0.002", "--no-png"]


def _fake_pair(interrupt_at=None):
    calls = []

    def pair(fa, fb, min_run_time=0.3, min_samples=3):
        calls.append(1)
        if interrupt_at is not None and len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return ({"median": 2e-3, "min": 2e-3, "samples": 3, "number": 1},
                {"median": 8e-3, "min": 8e-3, "samples": 3, "number": 1})

    return pair


def test_bench_interrupt_keeps_the_measured_rows_and_says_where(tmp_path, capsys, monkeypatch):
    prefix = str(tmp_path / "b")
    monkeypatch.setattr(bench_suite, "measure_pair", _fake_pair(interrupt_at=3))
    code, stdout, err = _run([*BENCH, "--out", prefix], capsys)
    # 2 structures x 1 size x 1 dtype x 2 batches x 2 modes
    assert "deftly bench: 8 rows" in stdout and "rough estimate" in stdout and f"{prefix}.partial.json" in stdout
    lines = err.strip().splitlines()
    assert code == 130 and len(lines) == 1, err
    assert lines[0] == (f"deftly bench: interrupted; the 2 of 8 rows measured are kept in {prefix}.partial.json "
                        f"(the JSON of the final results, with \"partial\": true)")
    part = json.loads(Path(prefix + ".partial.json").read_text())
    assert part["partial"] is True and part["rows_planned"] == 8 and len(part["rows"]) == 2
    assert {r["structure"] for r in part["rows"]} == {"monarch", "lowrank"}
    assert all(r["speedup"] == pytest.approx(4.0) for r in part["rows"])
    assert not Path(prefix + ".json").exists()
    # a complete run replaces the partial file by the results
    monkeypatch.setattr(bench_suite, "measure_pair", _fake_pair())
    code, stdout, _ = _run([*BENCH, "--out", prefix], capsys)
    assert code == 0 and not Path(prefix + ".partial.json").exists()
    assert len(json.loads(Path(prefix + ".json").read_text())["rows"]) == 8


def test_bench_interrupt_before_any_row(tmp_path, capsys, monkeypatch):
    prefix = str(tmp_path / "b")
    monkeypatch.setattr(bench_suite, "measure_pair", _fake_pair(interrupt_at=1))
    code, _, err = _run([*BENCH, "--out", prefix], capsys)
    assert code == 130 and err.strip() == f"deftly bench: interrupted; nothing measured yet ({prefix}.partial.json " \
                                          f"not written)"


def test_bench_estimate_is_the_documented_sum():
    """Known answer at a fixed machine speed (1 GFLOP/s): 2.2 (the overhead measured on the recorded runs)
    x per row, 2 warm-up pairs + max(min_run_time, min_samples pairs) + 0.02 s; a pair is 2 calls of
    nn.Linear's FLOPs + 50 us each; +1 call + 0.05 s for the memory probe of forward+backward rows."""
    from deftly.bench.config import BenchConfig

    cfg = BenchConfig(sizes=[(1000, 1000)], batches=[1, 1000], modes=["fwd", "fwdbwd"], structures=["lowrank"],
                      fft=False, min_run_time=0.3, min_samples=3, memory=True)
    want = 0.0
    for batch in (1, 1000):
        for mult, mem in ((1, False), (3, True)):
            call = 2 * 1000 * 1000 * batch * mult / 1e9 + 5e-5
            pair = 2 * call
            want += 2 * pair + max(0.3, 3 * pair) + 0.02 + ((call + 0.05) if mem else 0.0)
    assert bench_suite.estimate_seconds(cfg, rate=1e9) == pytest.approx(2.2 * want, rel=1e-12)
    assert bench_suite.count_rows(cfg) == 4
    cfg.structures = ["lowrank", "monarch", "butterfly"]
    cfg.fft = True  # the exact-FFT butterfly row: square sizes only, not bf16
    assert bench_suite.count_rows(cfg) == 4 * 4
    cfg.sizes = [(1000, 1000), (64, 128)]
    assert bench_suite.count_rows(cfg) == 4 * 4 + 4 * 3


def test_bench_without_matplotlib_skips_the_plot(tmp_path, capsys, monkeypatch, no_matplotlib):
    prefix = str(tmp_path / "b")
    monkeypatch.setattr(bench_suite, "measure_pair", _fake_pair())
    argv = [a for a in BENCH if a != "--no-png"]
    code, stdout, _ = _run([*argv, "--out", prefix], capsys)
    assert code == 0 and f"plot skipped ({prefix}.png not written): matplotlib is not installed" in stdout
    assert not Path(prefix + ".png").exists() and Path(prefix + ".json").exists()
    assert f"{prefix}.png" not in stdout.split("wrote ")[-1]

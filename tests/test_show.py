"""`deftly show`: the README's main job prints a row per structure and writes a real PNG."""

import deftly
from deftly.cli import main


def test_show_prints_every_structure_and_writes_png(tmp_path, capsys):
    png = tmp_path / "show.png"
    rc = main(["show", "--sizes", "24x24", "13x40", "--png", str(png), "--picture-size", "16"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = [line for line in out.splitlines() if line.startswith(("24x24", "13x40"))]
    assert len(lines) == 2 * len(deftly.structures())
    for name in deftly.structures():
        assert any(line.split()[1] == name for line in lines)
    for line in lines:  # self-check column is the relative error of forward vs to_dense
        assert float(line.split()[-1]) <= 1e-4
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_show_rejects_unknown_structure(tmp_path, capsys):
    rc = main(["show", "--structures", "nope", "--png", ""])
    assert rc == 2
    assert "unknown structure 'nope'" in capsys.readouterr().err


def test_show_without_matplotlib_prints_the_table_and_says_why_no_picture(tmp_path, capsys, monkeypatch):
    """After `pip install .` (no extras): the table, then one line saying the PNG was not written and why
    (was: a raw ModuleNotFoundError)."""
    import sys

    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    png = tmp_path / "show.png"
    rc = main(["show", "--sizes", "16x16", "--structures", "dense", "lowrank", "--png", str(png)])
    out, err = capsys.readouterr()
    assert rc == 0 and not err
    assert [line.split()[1] for line in out.splitlines() if line.startswith("16x16")] == ["dense", "lowrank"]
    assert out.strip().splitlines()[-1] == (f"picture skipped ({png} not written): matplotlib is not installed "
                                            "(pip install matplotlib, or pip install 'deftly[plot]')")
    assert not png.exists() and "wrote" not in out


def test_show_suggests_the_closest_name(capsys):
    rc = main(["show", "--structures", "lowrnak", "--png", ""])
    err = capsys.readouterr().err
    assert rc == 2 and "Did you mean 'lowrank'?" in err and len(err.strip().splitlines()) == 1

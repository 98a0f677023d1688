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

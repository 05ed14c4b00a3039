import subprocess
import sys

from fake_runs import T0, launch_rows, make_run

from gptrain.metrics.plots import plot_run, plot_val_curves, smooth
from gptrain.metrics.runs import read_run


def test_plots_are_png_files_and_the_same_rows_give_the_same_bytes(tmp_path):
    record = read_run(make_run(tmp_path, "p", launch_rows(0, 20, T0)))
    first = plot_run(record, tmp_path / "one.png").read_bytes()
    second = plot_run(record, tmp_path / "two.png").read_bytes()
    assert first.startswith(b"\x89PNG\r\n\x1a\n") and len(first) > 10_000 and first == second
    empty = read_run(make_run(tmp_path, "e", launch_rows(0, 2, T0, val_every=100)))
    assert plot_val_curves([record, empty], tmp_path / "val.png").stat().st_size > 5_000


def test_smoothing_keeps_the_length_and_starts_at_the_first_value():
    values = [float(v % 7) for v in range(500)]
    out = smooth(values)
    assert len(out) == 500 and out[0] == values[0] and max(out) < max(values)
    assert smooth([3.0, 1.0]) == [3.0, 1.0]  # short series are left as they are


def test_matplotlib_loads_only_when_plotting_and_never_pyplot(tmp_path):
    run_dir = make_run(tmp_path, "s", launch_rows(0, 5, T0))
    code = ("import sys; from pathlib import Path; import gptrain.metrics.report as r; "
            "assert 'matplotlib' not in sys.modules; r.write_report(Path(sys.argv[1])); "
            "assert 'matplotlib.pyplot' not in sys.modules")
    subprocess.run([sys.executable, "-c", code, str(run_dir)], check=True)

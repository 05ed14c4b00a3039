import subprocess
import sys

from gptrain.bench.chart import phase_bars, subtitle, write_bench_chart

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FULL = {"title": "GPT-2 124M, B=4, T=64, fp32, cpu: Test CPU",
        "runs": {"gptrain": {"forward_s": 0.31, "backward_s": 0.62, "optimizer_s": 0.08, "step_s": 1.02,
                             "tokens_per_s": 251.0},
                 "reference": {"forward_s": 0.4, "backward_s": 0.8, "optimizer_s": 0.1, "step_s": 1.3,
                               "tokens_per_s": 197.0},
                 "llmc": {"step_s": 1.29, "tokens_per_s": 198.4}},
        "step_time_ratio": 0.78, "matmul_limit_fraction": 0.7}


def test_charts_are_png_files_and_leave_no_temporary_files(tmp_path):
    full = write_bench_chart(FULL, tmp_path / "full.png")
    only = write_bench_chart({"title": "gptrain alone", "runs": {"gptrain": FULL["runs"]["gptrain"]}},
                             tmp_path / "only.png")
    empty = write_bench_chart({"runs": {}}, tmp_path / "empty.png")
    for path in (full, only, empty):
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and 5_000 < len(data) < 1_000_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.png", "full.png", "only.png"]
    assert write_bench_chart(FULL, tmp_path / "again.png").read_bytes() == full.read_bytes()


def test_each_phase_has_a_bar_per_run_that_timed_it():
    groups = phase_bars(FULL["runs"])
    assert [(phase, [name for name, _ in bars]) for _, phase, bars in groups] == [
        ("forward", ["gptrain", "reference"]), ("backward", ["gptrain", "reference"]),
        ("optimizer", ["gptrain", "reference"]), ("step", ["gptrain", "reference", "llmc"])]
    assert [phase for _, phase, _ in phase_bars({"llmc": {"step_s": 1.0}})] == ["step"]
    assert subtitle(FULL) == "step time gptrain/reference 0.78 · fraction of matmul limit 0.70"
    assert subtitle({"step_time_ratio": None}) == ""


def test_the_module_imports_without_matplotlib_and_never_loads_pyplot(tmp_path):
    code = ("import sys; from pathlib import Path; import gptrain.bench.chart as c; "
            "assert 'matplotlib' not in sys.modules; c.write_bench_chart({'runs': {}}, Path(sys.argv[1])); "
            "assert 'matplotlib.pyplot' not in sys.modules")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "c.png")], check=True)

"""The benchmark harness leaves the work tree clean unless told where to write."""

import json
import os
import subprocess
import sys
import textwrap

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
REPO = os.path.dirname(BENCHMARKS)


def test_results_go_to_an_ignored_path_by_default(tmp_path):
    # A benchmark run rewrote its tracked JSON in benchmarks/results/ (make bench dirtied the tree).
    script = tmp_path / "bench_tiny.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {BENCHMARKS!r})
        from harness import run_benchmark
        CANDIDATES = {{"pyssl": lambda config, device: (lambda: None)}}
        if __name__ == "__main__":
            run_benchmark(__file__, CANDIDATES, [{{"n": 1}}], name="pyssl_test_tiny")
    """)
    )
    expected = os.path.join(REPO, "runs", "benchmarks", "pyssl_test_tiny_cpu.json")
    fast = ["--device", "cpu", "--min-time", "0", "--max-iters", "1"]
    try:
        subprocess.run([sys.executable, str(script), *fast], check=True, capture_output=True, timeout=120)
        with open(expected) as f:
            assert json.load(f)["benchmark"] == "pyssl_test_tiny"
        ignored = subprocess.run(["git", "-C", REPO, "check-ignore", "-q", expected], capture_output=True)
        assert ignored.returncode == 0, f"{expected} is not git-ignored"
    finally:
        if os.path.exists(expected):
            os.remove(expected)
    assert not (tmp_path / "results").exists()  # where it used to go: beside the script

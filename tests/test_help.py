"""``--help`` of every program reads whole: one complete description paragraph and an
epilog with an example command whose flags the program accepts."""

import shlex
import subprocess
import sys

import pytest
from conftest import ROOT

PROGRAMS = ["spark/train_model.py", "spark/compute_codes.py", "spark/train_pca.py",
            "spark/pca_preparation.py", "spark/search.py", "spark/evaluate.py",
            "benchmarks/run.py"]


@pytest.mark.parametrize("program", PROGRAMS)
def test_help_has_a_whole_description_and_a_runnable_example(program):
    text = subprocess.run([sys.executable, str(ROOT / program), "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=True).stdout
    body = text.split("\n\n")
    description = body[1].strip()
    assert description.endswith(".") and "\n" not in description, description
    assert description[0].isupper(), description
    example = text.split("example (from the repository root, after `make demo`):\n")[1]
    argv = shlex.split(example.strip(), comments=True)
    assert program in argv, argv
    flags = [a for a in argv[argv.index(program) + 1:] if a.startswith("--")]
    assert flags and all(flag in text.split("options:")[1] for flag in flags), flags
    if program.startswith("spark/") and program != "spark/pca_preparation.py":
        from spark_helpers import load_driver
        driver = load_driver(program.split("/")[1][:-3])
        driver.parse_args(argv[argv.index(program) + 1:])  # the example's flags parse

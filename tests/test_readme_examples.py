"""Every Python example in the README runs as shown."""

import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples():
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example{i}" for i in range(len(EXAMPLES))])
def test_example_runs_and_prints_what_the_comments_say(code, tmp_path):
    script = tmp_path / "example.py"          # a file, so spawn children can import it
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # A comment after print(...) is the exact output of that line.
    promised = re.findall(r"print\(.*\)\s+#\s*(.+)", code)
    printed = [" ".join(line.split()) for line in proc.stdout.splitlines()]
    assert len(printed) >= len(promised), proc.stdout
    for expected in promised:
        assert " ".join(expected.split()) in printed, (expected, proc.stdout)

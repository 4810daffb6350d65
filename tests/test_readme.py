"""The README's Python snippets run as written, and its two set-up commands are the ones CI uses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_snippets_and_the_two_commands():
    text = README.read_text()
    assert len(SNIPPETS) >= 6
    main = re.search(r"<!-- ci:main-command -->\n```bash\n(.*?)\n```", text)
    test = re.search(r"<!-- ci:test-command -->\n```bash\n(.*?)\n```", text)
    assert main and "kexue reproduce --quick" in main.group(1) and "constraints-cpu.txt" in main.group(1)
    assert test and "pytest" in test.group(1) and '".[test]"' in test.group(1) and "KEXUE_DATA_DIR" in test.group(1)
    ci = (README.parent / ".ci" / "run").read_text()
    assert "ci:test-command" in ci


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index, capsys):
    code = SNIPPETS[index]
    exec(compile(code, f"README.md snippet {index}", "exec"), {"__name__": "__readme__"})

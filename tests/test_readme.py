"""The README's Python snippets run (those that need no hub model), so the docs cannot drift."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_the_two_setup_commands():
    text = README.read_text(encoding="utf-8")
    bash = re.findall(r"```bash\n(.*?)```", text, flags=re.S)[0]
    commands = [line for line in bash.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2
    assert "scripts/install.sh" in commands[0] and "medrwr " in commands[0]
    assert "pytest" in commands[1]


def test_protocol_snippet_runs():
    exec(compile(_python_blocks()[0], "README.md", "exec"), {})


def test_retrieval_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "knowledge_base.tsv").write_text(
        "id\ttext\n"
        "1\tCardiomegaly is an enlarged heart; common causes are heart failure and cardiomyopathy.\n"
        "2\tA pleural effusion is fluid between the pleural layers, blunting the costophrenic angle.\n"
        "3\tPneumothorax is air in the pleural space with a visible pleural line.\n",
        encoding="utf-8",
    )
    scope: dict = {}
    exec(compile(_python_blocks()[1], "README.md", "exec"), scope)
    hits = scope["hits"]
    assert [h[0].doc_id for h in hits] == ["1", "2"]

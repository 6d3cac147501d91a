"""The README's table of config groups names every choice that conf/ offers (and nothing else), so it
cannot fall behind the configs again."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ["model", "method", "bits", "sampler", "dataset", "eval", "calib", "search"]


def _readme_choices() -> dict[str, set[str]]:
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| group | choices |"):]
    table = table[:table.index("\n\n")]
    found: dict[str, set[str]] = {}
    for line in table.splitlines()[2:]:
        cells = line.split(" | ")
        group = re.match(r"\| `(\w+)`", cells[0])
        if group:
            found.setdefault(group.group(1), set()).update(re.findall(r"`([a-z0-9_]+)`", cells[1]))
    return found


@pytest.mark.parametrize("group", GROUPS)
def test_readme_lists_every_choice_of_the_group(group):
    files = {p.stem for p in (ROOT / "conf" / group).glob("*.yaml")}
    listed = _readme_choices()[group]
    assert not files - listed, f"README's config table lacks {group} choices: {sorted(files - listed)}"
    assert not listed - files, f"README's config table names {group} choices conf/ lacks: {sorted(listed - files)}"

"""The front page's promises: its test command is the one CI runs, and every link of README.md and docs/ leads
somewhere."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "experiments" / "README.md",
         REPO / "bench" / "README.md"]


def readme_commands() -> list[str]:
    """The command lines of README.md's first code block (comments left out)."""
    block = (REPO / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_the_readme_starts_with_the_demo_and_the_command_ci_runs():
    demo, tests = readme_commands()
    assert demo.startswith("python3 -m venv .venv") and demo.endswith("snakemake --cores 2 demo")
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert tests == ci and tests.endswith("pytest -q")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_leads_to_a_file(page):
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
    missing = [link for link in links if not re.match(r"[a-z]+://", link) and not (page.parent / link).exists()]
    assert not missing, f"{page.relative_to(REPO)} links to missing files: {missing}"

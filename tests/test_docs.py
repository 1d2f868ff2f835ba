"""The documentation names tests that exist."""

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_every_test_named_in_the_tests_readme_exists():
    readme = (TESTS / "README.md").read_text()
    named = re.findall(r"`(test_\w+\.py)::(test_\w+)`|`::(test_\w+)`", readme)
    assert len(named) > 20
    current_file = None
    missing = []
    for file, name, continued in named:
        current_file = file or current_file
        source = (TESTS / current_file).read_text()
        if not re.search(rf"^def {name or continued}\(", source, re.M):
            missing.append(f"{current_file}::{name or continued}")
    assert missing == []

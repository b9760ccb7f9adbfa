"""Rewrite the pip pins of the rules' conda envs to the versions of requirements.lock.

The envs name which packages each rule needs (envs/*.yaml, a subset of the project's
dependencies); the lock alone says which version. scripts/lock.sh runs this after every
regeneration, and tests/test_dependencies.py fails when a pin differs from the lock.
envs/vllm.yaml is not among them: vLLM needs its own, older transformers.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
LOCKED_ENVS = ("train", "eval", "report")
PIN = re.compile(r"^(?P<indent>\s*- )(?P<name>[A-Za-z0-9][\w.-]*)==(?P<version>[\w.+!-]+)", re.M)


def normalise(name: str) -> str:
    """PEP 503 form, so `huggingface_hub` and `huggingface-hub` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_versions(lock: Path = LOCK) -> dict[str, str]:
    """package (normalised) -> the exact version requirements.lock pins."""
    versions = {}
    for line in lock.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][\w.-]*)==([^\s;]+)", line)
        if match:
            versions[normalise(match.group(1))] = match.group(2)
    return versions


def env_pins(env: Path) -> dict[str, str]:
    """package (normalised) -> the version an env file pins."""
    return {normalise(m["name"]): m["version"] for m in PIN.finditer(env.read_text())}


def synced(text: str, versions: dict[str, str], env: Path) -> str:
    """`text` of `env` with every pin set to the lock's version (comments kept)."""

    def pin(match: re.Match) -> str:
        name = normalise(match["name"])
        if name not in versions:
            raise SystemExit(
                f"{env}: {match['name']} is not in {LOCK.name}; add it to pyproject.toml"
            )
        return f"{match['indent']}{match['name']}=={versions[name]}"

    return PIN.sub(pin, text)


def main() -> None:
    versions = lock_versions()
    for name in LOCKED_ENVS:
        env = REPO / "envs" / f"{name}.yaml"
        text = env.read_text()
        new = synced(text, versions, env)
        if new != text:
            env.write_text(new)
            print(f"updated {env.relative_to(REPO)}", file=sys.stderr)


if __name__ == "__main__":
    main()

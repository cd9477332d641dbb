"""requirements-lock.txt pins a stack that satisfies requirements.txt and requirements-dev.txt.

The loose files are what users who embed moe_jax install against; the lock is what CI and the
README's set-up install, so a fresh machine gets exactly the tested versions. When a loose
range moves past the lock (or a new requirement is missing from it), this test names the
package, and the lock is regenerated with the command written at its top.
"""

from __future__ import annotations

from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements-lock.txt"


def requirement_lines(path: Path) -> list[tuple[Path, str]]:
    """(file, requirement) for every requirement of `path`, following `-r other.txt`."""
    out = []
    for raw in path.read_text().splitlines():
        line = raw.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-r "):
            out += requirement_lines(path.parent / line[3:].strip())
        elif line.startswith("-"):
            raise AssertionError(f"{path.name}: unexpected option line {raw!r}")
        else:
            out.append((path, line))
    return out


def locked_versions() -> dict[str, Version]:
    pins = {}
    for _, line in requirement_lines(LOCK):
        req = Requirement(line)
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"{LOCK.name}: {line!r} is not an exact pin"
        pins[canonicalize_name(req.name)] = Version(spec[0].version)
    return pins


def test_lock_satisfies_every_requirement_file():
    pins = locked_versions()
    for path in (REPO / "requirements.txt", REPO / "requirements-dev.txt"):
        for source, line in requirement_lines(path):
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate():
                continue
            name = canonicalize_name(req.name)
            assert name in pins, f"{source.name}: {line!r} is not in {LOCK.name}; regenerate the lock"
            assert req.specifier.contains(pins[name], prereleases=True), (
                f"{source.name}: {line!r} does not admit the locked {name}=={pins[name]}; regenerate the lock")


def test_lock_says_how_it_was_made_and_names_no_machine_path():
    text = LOCK.read_text()
    assert "pip-compile" in text.split("\n\n")[0] and "requirements-dev.txt" in text.split("\n\n")[0]
    for bad in ("file://", "--find-links", "--index-url", "--extra-index-url", "/opt/", "/tmp/", "/work/"):
        assert bad not in text, f"{LOCK.name} names {bad!r}: regenerate it with --no-emit-index-url " \
                                "--no-emit-find-links"
    assert "jax" in locked_versions() and "torch" in locked_versions()

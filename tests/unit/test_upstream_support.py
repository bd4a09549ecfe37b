"""The run-time check (stopright/upstream/support.py): which part applies; one warning for one that does not.

The checks run against the installed libraries here (they all pass: these are the pinned
versions); a version outside the range and a changed shape are faked with ``monkeypatch``.
A worker and a gunicorn master given an unsupported version: tests/e2e/test_unsupported_versions.py.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
import tomllib
from pathlib import Path

import pytest

from stopright.upstream import billiard as billiard_internals
from stopright.upstream import celery as celery_internals
from stopright.upstream import checks_celery, shapes, support
from tests.shapes import upstream_modules

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _undecided(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(support, "_decided", {})


@pytest.mark.parametrize("name", list(support.PARTS))
def test_every_part_applies_on_the_installed_versions(name: str) -> None:
    assert support.problem(name) is None


def test_every_copied_method_is_checked_by_its_digest_before_the_pool_is_replaced() -> None:
    assert set(celery_internals.DIGESTS) == set(checks_celery.COPIES)
    seen: list[str] = []
    original = shapes.check_digest

    def recording(reach: str, *args: object) -> None:
        seen.append(reach)
        original(reach, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(shapes, "check_digest", recording)
        checks_celery.worker_stop()
    assert seen == [*celery_internals.DIGESTS, "billiard.pool.Worker._do_exit"]
    assert "billiard.pool.Worker._do_exit" in billiard_internals.REACHES


def test_every_reach_a_start_check_names_is_a_reach(monkeypatch: pytest.MonkeyPatch) -> None:
    """A renamed reach cannot leave a start check naming the old one."""
    named: set[str] = set()
    for name in ("check_digest", "check_override", "check_signature", "check_calls", "check_text",
                 "check_attributes", "check_no_call"):
        original = getattr(shapes, name)

        def recording(reach: str, *args: object, _original=original, **kwargs: object) -> None:
            named.add(reach)
            _original(reach, *args, **kwargs)

        monkeypatch.setattr(shapes, name, recording)
    for part in support.PARTS.values():
        part.check()
    reaches = {key for module in upstream_modules().values() for key in module.REACHES}
    assert named, "no check ran"
    assert named - reaches == set()


def test_the_declared_ranges_are_the_checked_ones() -> None:
    """stopright/pyproject.toml declares what support.SUPPORTED checks at run time."""
    project = tomllib.loads((ROOT / "stopright" / "pyproject.toml").read_text())["project"]
    declared = {}
    for requirement in [*project["dependencies"], *project["optional-dependencies"]["gunicorn"]]:
        name, low, high = re.fullmatch(r"([a-z]+)>=([\d.]+),<([\d.]+)", requirement).groups()
        declared[name] = (low, high)
    assert declared == support.SUPPORTED


@pytest.mark.parametrize(("version", "release"), [("5.7.0", (5, 7, 0)), ("5.8.0rc1", (5, 8, 0)),
                                                  ("27.0.1.post1", (27, 0, 1)), ("x", ())])
def test_a_version_is_compared_by_its_release(version: str, release: tuple[int, ...]) -> None:
    assert support.release(version) == release


def _installed(monkeypatch: pytest.MonkeyPatch, **versions: str) -> None:
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: versions.get(name) or real(name))


@pytest.mark.parametrize("version", ["5.6.3", "5.8.0", "6.0.0"])
def test_a_version_outside_the_range_keeps_the_stock_part_with_one_warning(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, version: str) -> None:
    _installed(monkeypatch, celery=version)
    caplog.set_level(logging.WARNING)
    assert [support.applies("consumer") for _ in range(3)] == [False] * 3
    assert support.applies("gunicorn master")  # no Celery in it: applies
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"celery {version} is outside the supported range >=5.7.0,<5.8" in warnings[0]
    assert support.PARTS["consumer"].applies in warnings[0] and support.PARTS["consumer"].stock in warnings[0]


def test_a_changed_copied_method_keeps_the_stock_part_naming_the_reach(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from celery.concurrency import prefork

    def on_stop(self) -> None:  # another body: another digest
        return None

    monkeypatch.setattr(prefork.TaskPool, "on_stop", on_stop)
    caplog.set_level(logging.WARNING)
    assert not support.applies("worker stop")
    assert support.applies("remote shutdown")
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "(digest " in warning and "[reach: 'celery.concurrency.prefork.TaskPool.on_stop']" in warning


def test_a_check_that_breaks_is_a_mismatch_not_a_crash(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> None:
        raise OSError("could not get source code")  # e.g. a library installed without its .py files

    part = support.PARTS["beat"]
    monkeypatch.setitem(support.PARTS, "beat", support.Part(part.applies, part.stock, part.libraries, broken))
    caplog.set_level(logging.WARNING)
    assert not support.applies("beat")
    assert "could not get source code" in caplog.text


def test_a_library_not_installed_is_a_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    def version(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert support.problem("gunicorn master") == "gunicorn is not installed"

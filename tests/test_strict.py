"""The one strictness switch: with SPARSEKERN_STRICT=1 (or CI=true) a test whose strict
requirement (requires_cpp, requires_nvcc) is missing fails; without it, and for the other
requirements always, it is skipped with the reason."""

import pytest

from tests import support


class FakeItem:
    def __init__(self, marker):
        self.marks = [getattr(pytest.mark, marker).mark]
        self.added = []

    def iter_markers(self):
        return iter(self.marks)

    def add_marker(self, mark):
        self.added.append(mark.mark)


@pytest.fixture
def nothing_built(monkeypatch):
    missing = {
        name: support.Requirement(lambda name=name: (False, f"{name} is missing"), req.strict, req.what)
        for name, req in support.REQUIREMENTS.items()
    }
    monkeypatch.setattr(support, "REQUIREMENTS", missing)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("marker", list(support.REQUIREMENTS))
def test_missing_requirement_skips_or_fails(nothing_built, monkeypatch, marker, strict):
    monkeypatch.setattr(support, "STRICT", strict)
    item = FakeItem(marker)
    support.skip_unmet([item])
    fails = strict and support.REQUIREMENTS[marker].strict
    assert [(m.name, m.kwargs) for m in item.added] == (
        [] if fails else [("skip", {"reason": f"{marker}: {marker} is missing"})]
    )
    if fails:
        with pytest.raises(pytest.fail.Exception, match="SPARSEKERN_STRICT=1 / CI=true"):
            support.check_strict(item)
    else:
        support.check_strict(item)


def test_strict_requirements_are_the_builds():
    assert {n for n, r in support.REQUIREMENTS.items() if r.strict} == {"requires_cpp", "requires_nvcc"}


@pytest.mark.parametrize(
    "env,strict",
    [({}, False), ({"SPARSEKERN_STRICT": "1"}, True), ({"CI": "true"}, True), ({"SPARSEKERN_STRICT": "0"}, False),
     ({"CI": "false"}, False), ({"SPARSEKERN_STRICT": "yes"}, True), ({"SPARSEKERN_REQUIRE_CPP": "1"}, False)],
)  # fmt: skip
def test_strict_switch(env, strict):
    assert support.strict_from(env) is strict

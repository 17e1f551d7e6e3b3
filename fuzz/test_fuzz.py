"""Fuzz refimpl-server (see conftest.py for the profiles, the corpus and the summary).

Under the "ci" profile each target runs once with a fixed example budget and must find
nothing.  Under ``--hypothesis-profile=campaign`` only ``test_campaign`` runs: all targets in
turns, until ``--campaign-minutes`` have passed or the run is interrupted; it fails if any
distinct failure was found.
"""

from __future__ import annotations

import pytest

from targets import all_targets


@pytest.mark.parametrize("target", list(all_targets()))
def test_target(fuzz_context, target):
    failure = fuzz_context.run(target, all_targets()[target])
    if failure is not None:
        raise failure


def test_campaign(fuzz_context):
    fuzz_context.campaign()
    assert not fuzz_context.failures, "the campaign found: " + "; ".join(fuzz_context.failures)

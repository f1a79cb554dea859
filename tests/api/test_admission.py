"""The edge's concurrency limit and the Retry-After its 429s carry (a fake clock, no waiting)."""

from __future__ import annotations

import pytest

from parley.api import admission as admission_module
from parley.api.admission import Admission
from parley.api.errors import ApiError


def test_full_means_429_with_a_retry_after_from_recent_hold_times(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(admission_module.time, "monotonic", lambda: now[0])
    admission = Admission(limit=2)
    for _ in range(60):  # requests that each hold their slot 30 s
        taken = admission.acquire()
        now[0] += 30
        admission.release(taken)
    first, second = admission.acquire(), admission.acquire()
    with pytest.raises(ApiError) as refused:
        admission.acquire()
    # two slots held ~30 s each: one frees in about 15 s
    assert refused.value.status == 429 and 14 <= refused.value.retry_after <= 16
    admission.release(first)
    assert admission.acquire() and admission.in_flight == 2
    del second


def test_retry_after_is_at_least_a_second():
    admission = Admission(limit=1)
    admission.acquire()
    with pytest.raises(ApiError) as refused:
        admission.check()
    assert refused.value.retry_after >= 1

"""The kill -9 journal's segments: which survive a roll, and what a replay finds. Through
the journal itself on real files; the kill, the replay and the full disk through the real
server are in test_hostile.py and test_reliability.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxy.storage import journal as journal_mod
from proxy.storage.journal import Journal
from proxy.storage.row import UsageRow

PAD = "p" * 400  # a row line of about 700 bytes


def _row(call_id: str, outcome: str = "ok") -> UsageRow:
    return UsageRow(id=call_id, ts="2026-12-04T00:00:00.000000Z", key_name="k",
                    outcome=outcome, status=200, error=PAD)


def die(j: Journal) -> None:
    """What a kill -9 does to the journal: its files and what was written into them stay,
    their locks go (test_refusal_folding.py uses it too)."""
    for segment in j._segments:
        os.close(segment.fd)
    j._segments = []


def test_a_call_whose_lines_straddle_a_roll_is_replayed_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`long` goes upstream in one segment and finishes in the next; that next segment's
    own calls all commit and the journal rolls on. The segment holding `long`'s real row
    must stay until `long` commits: a kill then replays its real row, not the stand-in."""
    monkeypatch.setattr(journal_mod, "SEGMENT_BYTES", 8 * 1024)
    j = Journal(tmp_path)
    j.began(_row("long"))
    first = j._current
    n = 0
    while j._current is first:  # other calls, begun and committed, until it rolls
        n += 1
        j.began(_row(f"a{n}"))
        j.committed([f"a{n}"])
    j.finished(_row("long", outcome="cut_by_client"))  # its real row, in the second
    second = j._current
    while j._current is second:
        n += 1
        j.began(_row(f"b{n}"))
        j.committed([f"b{n}"])
    assert second in j._segments  # kept for `long` alone
    die(j)
    rows = journal_mod.recover(tmp_path)
    assert [(r.id, r.outcome) for r in rows] == [("long", "cut_by_client")]
    assert not list(tmp_path.glob("journal-*"))  # replayed, gone


def test_segments_go_once_their_calls_commit(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_mod, "SEGMENT_BYTES", 8 * 1024)
    j = Journal(tmp_path)
    for n in range(200):  # about 140 KB of lines: many rolls
        j.began(_row(f"c{n}"))
        j.finished(_row(f"c{n}"))
        j.committed([f"c{n}"])
    assert list(tmp_path.glob("journal-*")) == [j._current.path]
    j.close()
    assert not list(tmp_path.glob("journal-*"))

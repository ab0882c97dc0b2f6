"""docs/protocol.md shows what the server sends: every JSON example in it is captured from real games
(tests/experiment/protocol_examples.py), and this test fails, with a diff, as soon as one differs.

Rewrite the examples after a change to the protocol with::

    .venv/bin/python -m pytest tests/experiment/test_protocol_examples.py --update-protocol-examples
"""

from __future__ import annotations

import json

import pytest

from tests.experiment import gamekit, protocol_examples
from tests.experiment.protocol_examples import DOC, START, TIMESTAMP, UPDATE_COMMAND, UPDATE_OPTION, blocks, differences, rewrite

executor_connections_closed = gamekit.executor_connections_closed


def test_every_json_block_of_the_doc_is_marked() -> None:
    found, problems = blocks(DOC.read_text(encoding="utf-8"))
    assert not problems, "\n".join(problems)
    assert len(found) >= 30


def test_an_unmarked_or_misplaced_block_is_found() -> None:
    text = "\n".join([
        "<!-- example: one -->", "```json", "{}", "```",
        "```json", "{}", "```",  # no marker
        "<!-- example: two -->", "", "```json", "{}", "```",  # a blank line between
        "<!-- example: one -->", "```JSON", "{}", "```",  # a name used twice
        "```python", "x = 1", "```",
    ])
    found, problems = blocks(text)
    assert [b.name for b in found] == ["one"]
    assert len(problems) == 4, problems


@pytest.mark.django_db(transaction=True)
async def test_the_doc_shows_what_the_server_sends(request: pytest.FixtureRequest) -> None:
    captured = await protocol_examples.capture()
    text = DOC.read_text(encoding="utf-8")
    found, problems = blocks(text)
    assert not problems, "\n".join(problems)
    # Not vacuous: one example for every block and one block for every example; none is empty.
    unmatched = [p for p in differences(text, captured) if " differs from the capture" not in p]
    assert not unmatched, "\n".join(unmatched)
    assert len(captured) == len(found) and all(body.strip() for body in captured.values())
    for name, body in captured.items():
        try:
            json.loads(body)
        except ValueError:  # several frames, one per line
            [json.loads(line) for line in body.split("\n")]
        # Every time shown comes from the capture's clock (never the wall clock, which would change every run).
        for stamp in TIMESTAMP.finditer(body):
            assert stamp[0].startswith(START.date().isoformat()) and stamp[1], (name, stamp[0])
    if request.config.getoption(UPDATE_OPTION):
        updated = rewrite(DOC.read_text(encoding="utf-8"), captured)
        DOC.write_text(updated, encoding="utf-8")
        assert not differences(updated, captured)
        return
    # The comparison sees a field missing from one block.
    sample = next(b for b in found if '"paused": false,' in b.body)
    assert differences(text.replace(sample.body, sample.body.replace('"paused": false,', "", 1), 1), captured)
    problems = differences(text, captured)
    if problems:
        pytest.fail(f"docs/protocol.md does not show what the server sends ({len(problems)} of {len(found)} examples differ). "
                    f"If the change is intended, rewrite the examples with\n    {UPDATE_COMMAND}\n\n" + "\n\n".join(problems),
                    pytrace=False)

"""detector.progress: a bar on a terminal, periodic log lines elsewhere."""


def test_progress_logs_lines_when_not_on_a_terminal(caplog):
    """Adaptation and feature extraction printed nothing for minutes when stderr was a file."""
    import logging

    from detector.progress import progress

    with caplog.at_level(logging.INFO, logger="detector.progress"):
        assert list(progress(range(5), desc="extract", every_s=0.0, terminal=False)) == list(range(5))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("extract: 1/5 (20%)") and lines[-1].startswith("extract: 5/5 (100%)")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="detector.progress"):
        list(progress(iter(range(3)), desc="adapt", every_s=3600.0, terminal=False))
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["adapt: 1", "adapt: 3"]

"""The fault tests' counting must be able to say 'lost' and 'duplicated' (else it proves nothing)."""

from types import SimpleNamespace as Row

from tests.serve.farmkit import count_line


def _job(id_, status, code=None):
    return Row(id=id_, status=status, error_code=code)


def test_count_line_counts_losses_and_duplicates():
    jobs = [_job("a", "completed"), _job("b", "failed", "out_of_memory"), _job("c", "in_progress"),
            _job("d", "completed")]
    events = [Row(video_id="a"), Row(video_id="b"), Row(video_id="a"), Row(video_id="d"), Row(video_id="x")]
    line, lost, duplicated = count_line(4, jobs, rows=5, events=events, missing=("d",))
    assert (lost, duplicated) == (2, 2)  # c never ended, d has no clip; one extra row, a ended twice
    assert line == "submitted 4, completed 1, failed 1 (out_of_memory: 1), lost 2, duplicated 2"
    clean = count_line(2, jobs[:2], rows=2, events=events[:2])
    assert clean[1:] == (0, 0) and clean[0].endswith("lost 0, duplicated 0")

"""pipelines/report.py: the run's table on evaluations of any shape."""
from cascade_ranking.pipelines import report


def test_ranking_against_preranking_reads_a_recall_curve_shorter_than_the_quota():
    """A log of one candidate per request (the Open Bandit sample) gives recall@k curves of length 1:
    at a quota of 3 every candidate is kept, so the recall at 3 is the curve's last value."""
    evaluation = {"cascade": {"quotas": [12, 6, 3], "recall_at_k": {"model": [0.25], "preranking_model": [0.5]}}}
    assert report.ranking_vs_preranking_at(evaluation) == (3, 0.25, 0.5)
    longer = {"cascade": {"quotas": [2], "recall_at_k": {"model": [0.1, 0.2, 0.3], "preranking_model": [0.4, 0.5, 0.6]}}}
    assert report.ranking_vs_preranking_at(longer) == (2, 0.2, 0.5)

"""StereoSet and CrowS-Pairs metrics against hand-counted toy examples."""

import pytest

from amendlm.bias.metrics import cluster_outcome, crows_score, icat, stereoset_score


def test_cluster_outcome_counts_and_ties():
    # stereo > anti, both above unrelated
    assert cluster_outcome("t", -1.0, -2.0, -3.0).pro_stereotype == 1
    assert cluster_outcome("t", -1.0, -2.0, -3.0).related == 2
    # a stereo/anti tie is not stereotypical; a tie with unrelated is not "related"
    tie = cluster_outcome("t", -2.0, -2.0, -2.0)
    assert (tie.pro_stereotype, tie.related) == (0, 0)
    anti_wins = cluster_outcome("t", -3.0, -1.0, -2.0)
    assert (anti_wins.pro_stereotype, anti_wins.related) == (0, 1)


def test_stereoset_macro_average_over_targets():
    # target a: 3 clusters, 2 pro, related 2+2+1 = 5 of 6 -> SS_a 66.67, LMS_a 83.33
    # target b: 1 cluster, 0 pro, related 0 of 2      -> SS_b 0,     LMS_b 0
    outcomes = [
        cluster_outcome("a", -1, -2, -3),  # pro, 2
        cluster_outcome("a", -1, -2, -3),  # pro, 2
        cluster_outcome("a", -2, -1, -1.5),  # anti, 1
        cluster_outcome("b", -5, -4, -1),  # anti, 0
    ]
    score = stereoset_score(outcomes)
    assert score.ss == pytest.approx((200 / 3 + 0) / 2)  # macro, not 2/4 = 50 micro
    assert score.lms == pytest.approx((500 / 6 + 0) / 2)
    assert score.icat == pytest.approx(score.lms * min(score.ss, 100 - score.ss) / 50)
    assert (score.n_clusters, score.n_targets) == (4, 2)


def test_icat_ideal_and_extremes():
    assert icat(100.0, 50.0) == 100.0
    assert icat(100.0, 100.0) == 0.0
    assert icat(80.0, 60.0) == pytest.approx(64.0)


def test_stereoset_score_rejects_empty():
    with pytest.raises(ValueError):
        stereoset_score([])


def test_crows_ties_are_neutral_and_stay_in_denominator():
    more = [-1.0, -3.0, -2.0, -1.0]
    less = [-2.0, -1.0, -2.0, -5.0]
    directions = ["stereo", "stereo", "stereo", "antistereo"]
    score = crows_score(more, less, directions)
    assert score.metric == pytest.approx(100 * 2 / 4)  # pairs 0 and 3; the tie (2) counts in N
    assert score.stereo_metric == pytest.approx(100 / 3)
    assert score.antistereo_metric == pytest.approx(100.0)
    assert score.n_ties == 1


def test_crows_length_mismatch():
    with pytest.raises(ValueError):
        crows_score([1.0], [1.0, 2.0], ["stereo"])

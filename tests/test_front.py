"""afm_ray.domination: domination, layers, crowding distance and hypervolume on hand-made points.

Every expected value is worked out by hand in the comments; random cases are checked against a
brute-force definition instead.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from afm_ray.domination import (
    crowding_distance,
    dominance_matrix,
    hypervolume,
    maximised,
    non_dominated,
    nondominated_layers,
    pareto_mask,
)

NAN = float("nan")
INF = math.inf

# --------------------------------------------------------------------------- domination and layers


def test_front_two_objectives_with_ties():
    values = [
        [0.5, 0.8],  # 0 front
        [0.6, 0.7],  # 1 front
        [0.4, 0.9],  # 2 front
        [0.5, 0.7],  # 3 dominated by 0 and 1
        [0.6, 0.7],  # 4 identical to 1: ties share the front
        [0.3, 0.3],  # 5 dominated by everything, including 3
    ]
    assert pareto_mask(values, ["max", "max"]).tolist() == [True, True, True, False, True, False]
    assert nondominated_layers(values, ["max", "max"]).tolist() == [1, 1, 1, 2, 1, 3]


def test_front_max_min_mix_and_flipped_goal():
    # accuracy (max) against parameter count (min)
    values = [[0.9, 10], [0.8, 5], [0.9, 12], [0.7, 5], [0.95, 20]]
    # (0.9,10) beats (0.9,12) on params; (0.8,5) beats (0.7,5) on accuracy
    assert pareto_mask(values, ["max", "min"]).tolist() == [True, True, False, False, True]
    assert nondominated_layers(values, ["max", "min"]).tolist() == [1, 1, 2, 2, 1]
    # maximising both, (0.95,20) dominates all; the rest form a chain 2 > 0 > 1 > 3
    assert pareto_mask(values, ["max", "max"]).tolist() == [False, False, False, False, True]
    assert nondominated_layers(values, ["max", "max"]).tolist() == [3, 4, 2, 5, 1]


def test_front_three_objectives():
    # maximise a and b, minimise c
    values = [
        [0.9, 0.5, 3],  # 0 front
        [0.8, 0.6, 3],  # 1 front (best b among c=3)
        [0.8, 0.5, 1],  # 2 front: dominated in (a, b) but the smallest c
        [0.8, 0.5, 3],  # 3 dominated by 0, 1 and 2
        [0.9, 0.5, 3],  # 4 identical to 0
        [0.7, 0.7, 5],  # 5 front: best b
    ]
    goals = ["max", "max", "min"]
    assert pareto_mask(values, goals).tolist() == [True, True, True, False, True, True]
    assert nondominated_layers(values, goals).tolist() == [1, 1, 1, 2, 1, 1]
    d = dominance_matrix(values, goals)
    assert d[[0, 1, 2, 4], 3].all() and not d[5, 3]
    assert not d[0, 4] and not d[4, 0]  # ties do not dominate each other


def test_front_single_objective_and_brute_force_agreement():
    assert pareto_mask([[1.0], [2.0], [2.0]], ["max"]).tolist() == [False, True, True]
    assert pareto_mask([[1.0], [2.0], [2.0]], ["min"]).tolist() == [True, False, False]
    rng = np.random.default_rng(0)
    for m in (2, 3, 4):
        v = rng.integers(0, 4, size=(40, m)).astype(float)  # small ints: many ties
        goals = ["max", "min", "max", "min"][:m]
        s = v * np.where(np.array(goals) == "max", 1, -1)
        brute = [not any(all(s[j] >= s[i]) and any(s[j] > s[i]) for j in range(len(s))) for i in range(len(s))]
        assert pareto_mask(v, goals).tolist() == brute
        layers = nondominated_layers(v, goals)
        for k in range(1, layers.max() + 1):  # layer k = front of what layers >= k leave
            rest = layers >= k
            assert (layers[rest] == k).tolist() == pareto_mask(v[rest], goals).tolist()


def test_single_point_duplicates_and_empty():
    assert pareto_mask([[0.3, 7.0]], ["max", "min"]).tolist() == [True]
    assert nondominated_layers([[0.3, 7.0]], ["max", "min"]).tolist() == [1]
    # all rows identical: nobody dominates anybody, one front
    same = [[0.5, 2.0]] * 3
    assert pareto_mask(same, ["max", "min"]).tolist() == [True, True, True]
    assert not dominance_matrix(same, ["max", "min"]).any()
    assert pareto_mask([], ["max", "max"]).tolist() == []
    assert nondominated_layers(np.empty((0, 2)), ["max", "min"]).tolist() == []


def test_minimised_columns_mirror_maximised_ones():
    # negating a column and flipping its mode changes nothing
    rng = np.random.default_rng(1)
    v = rng.integers(0, 5, size=(30, 3)).astype(float)
    flipped = v * [1, -1, -1]
    assert pareto_mask(v, ["max", "max", "min"]).tolist() == pareto_mask(flipped, ["max", "min", "max"]).tolist()
    assert maximised([[1.0, 2.0]], ["max", "min"]).tolist() == [[1.0, -2.0]]


def test_non_dominated_indices_skip_nan_rows():
    # the sweep's summary hands plain rows; a NaN row (say, no AutoAttack) is never optimal
    rows = [[0.5, 0.8], [0.6, NAN], [0.4, 0.9], [0.5, 0.7], [0.9, 0.9]]
    assert non_dominated(rows, ["max", "max"]) == [4]
    assert non_dominated(rows[:4], ["max", "max"]) == [0, 2]
    assert non_dominated(rows[:4], ["min", "min"]) == [2, 3]
    assert non_dominated([], ["max"]) == []
    assert non_dominated([[NAN, 1.0]], ["max", "max"]) == []


def test_front_rejects_nan_and_bad_goals():
    with pytest.raises(ValueError, match="NaN"):
        pareto_mask([[0.5, NAN]], ["max", "max"])
    with pytest.raises(ValueError, match="'max' or 'min'"):
        pareto_mask([[0.5, 0.2]], ["max", "up"])
    with pytest.raises(ValueError, match="2 goals for 3"):
        pareto_mask([[0.5, 0.2, 0.1]], ["max", "max"])
    with pytest.raises(ValueError, match="2-D"):
        pareto_mask([0.5, 0.2], ["max", "max"])


# --------------------------------------------------------------------------- crowding distance


def test_crowding_distance_two_objectives():
    # a front sorted on x: x = 0, 1, 3, 4 (range 4), y = 4, 3, 1, 0 (range 4)
    front = [[0, 4], [1, 3], [3, 1], [4, 0]]
    # interior: row 1 has neighbours x 0 and 3, y 4 and 1 -> 3/4 + 3/4; row 2 likewise (1..4, 3..0)
    assert crowding_distance(front, ["max", "max"]).tolist() == [INF, 1.5, 1.5, INF]
    # the same with the second column minimised: distance has no direction
    assert crowding_distance(front, ["max", "min"]).tolist() == [INF, 1.5, 1.5, INF]
    # row order does not matter
    assert crowding_distance(front[::-1], ["max", "max"]).tolist() == [INF, 1.5, 1.5, INF]


def test_crowding_distance_three_objectives_and_constant_column():
    v = [[0, 2, 5], [1, 1, 5], [2, 0, 5], [0.5, 1.5, 5]]
    # the last column is constant: no boundary, no contribution. x sorted: 0, 0.5, 1, 2 (rows 0 3 1 2)
    # row 3: (1 - 0)/2 on x, (2 - 1)/2 on y -> 1.0; row 1: (2 - 0.5)/2 + (1.5 - 0)/2 -> 1.5
    assert crowding_distance(v, ["max", "max", "min"]).tolist() == [INF, 1.5, INF, 1.0]


def test_crowding_distance_duplicates_single_and_small():
    # the second copy of (1, 3) adds no spread: 0; the rest as if it were absent
    v = [[0, 4], [1, 3], [1, 3], [3, 1], [4, 0]]
    assert crowding_distance(v, ["max", "max"]).tolist() == [INF, 1.5, 0.0, 1.5, INF]
    assert crowding_distance([[1, 2]], ["max", "max"]).tolist() == [INF]
    assert crowding_distance([[1, 2], [2, 1]], ["max", "max"]).tolist() == [INF, INF]
    assert crowding_distance([[1, 2], [1, 2]], ["max", "max"]).tolist() == [INF, 0.0]
    assert crowding_distance(np.empty((0, 2)), ["max", "max"]).tolist() == []
    with pytest.raises(ValueError, match="NaN"):
        crowding_distance([[1, NAN]], ["max", "max"])


# --------------------------------------------------------------------------- hypervolume


def test_hypervolume_two_objectives_by_hand():
    # maximise both from reference (0, 0): the union of [0,1]x[0,3], [0,2]x[0,2], [0,3]x[0,1],
    # in strips of width 1 along x: 3 + 2 + 1 = 6
    pts = [[1, 3], [2, 2], [3, 1]]
    assert hypervolume(pts, ["max", "max"], [0, 0]) == 6.0
    # a dominated point, a duplicate and a point beyond the reference change nothing
    assert hypervolume([*pts, [1, 1], [2, 2], [-1, 5]], ["max", "max"], [0, 0]) == 6.0
    # minimised: (params, error) below the reference (10, 1)
    assert hypervolume([[2, 0.5], [6, 0.25]], ["min", "min"], [10, 1]) == pytest.approx(8 * 0.5 + 4 * 0.25)
    # mixed: accuracy (max) over 0.5, params (min) under 10
    assert hypervolume([[0.9, 4], [0.7, 2]], ["max", "min"], [0.5, 10]) == pytest.approx(0.4 * 6 + 0.2 * 2)


def test_hypervolume_single_point_and_edge_cases():
    assert hypervolume([[0.8, 0.6]], ["max", "max"], [0.5, 0.5]) == pytest.approx(0.3 * 0.1)
    assert hypervolume([[0.8, 0.5]], ["max", "max"], [0.5, 0.5]) == 0.0  # on the reference: no volume
    assert hypervolume(np.empty((0, 2)), ["max", "max"], [0, 0]) == 0.0
    assert hypervolume([[3.0], [5.0]], ["max"], [1.0]) == 4.0
    assert hypervolume([[1, 1, 1]], ["max"] * 3, [0, 0, 0]) == 1.0
    with pytest.raises(ValueError, match="reference has 3 values for 2"):
        hypervolume([[1, 1]], ["max", "max"], [0, 0, 0])


def test_hypervolume_three_objectives_by_hand():
    # two unit-wide boxes from the origin: [0,2]x[0,1]x[0,1] and [0,1]x[0,2]x[0,1] overlap in the
    # unit cube: 2 + 2 - 1 = 3; a third point (1, 1, 2) adds [0,1]^2 x [1,2]: 1 more
    assert hypervolume([[2, 1, 1], [1, 2, 1]], ["max"] * 3, [0, 0, 0]) == 3.0
    assert hypervolume([[2, 1, 1], [1, 2, 1], [1, 1, 2]], ["max"] * 3, [0, 0, 0]) == 4.0
    # minimising the third column from reference 3: the first two boxes span [1, 3] there,
    # 4 + 4 - 2 (overlap) = 6, and (1, 1, 2) now lies inside them
    assert hypervolume([[2, 1, 1], [1, 2, 1], [1, 1, 2]], ["max", "max", "min"], [0, 0, 3]) == 6.0


def _inclusion_exclusion(points: np.ndarray, ref: np.ndarray) -> float:
    # Maximisation: volume of the union of boxes [ref, p], summing over every subset's intersection.
    total = 0.0
    for k in range(1, len(points) + 1):
        for subset in itertools.combinations(points, k):
            total += (-1) ** (k + 1) * np.prod(np.clip(np.min(subset, axis=0) - ref, 0, None))
    return total


@pytest.mark.parametrize("m", [2, 3, 4])
def test_hypervolume_matches_inclusion_exclusion(m):
    rng = np.random.default_rng(m)
    modes = ["max", "min", "max", "min"][:m]
    sign = np.where(np.array(modes) == "max", 1.0, -1.0)
    for _ in range(5):
        v = rng.integers(0, 6, size=(7, m)).astype(float)  # ties and dominated points included
        ref = np.where(sign > 0, 0.5, 5.5)
        expected = _inclusion_exclusion(v * sign, ref * sign)
        assert hypervolume(v, modes, ref) == pytest.approx(expected)

"""Metrics over hand-computed accuracy matrices (arithmetic in the comments)."""
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cl.engine import metrics as M

pytestmark = pytest.mark.unit

NAN = float("nan")


# --- stage accuracies: sample-weighted ---------------------------------------------------------------

def test_stage_accuracies_weighted_by_counts():
    R = [[90, NAN, NAN],
         [60, 80, NAN],
         [30, 60, 90]]
    counts = [10, 30, 60]
    # A_0 = 90
    # A_1 = (60*10 + 80*30) / 40 = (600 + 2400) / 40 = 75
    # A_2 = (30*10 + 60*30 + 90*60) / 100 = (300 + 1800 + 5400) / 100 = 75
    np.testing.assert_allclose(M.stage_accuracies(R, counts), [90, 75, 75])
    # AIA = (90 + 75 + 75) / 3 = 80 ; last = 75
    assert M.average_incremental_accuracy(R, counts) == pytest.approx(80.0)
    assert M.last_accuracy(R, counts) == pytest.approx(75.0)
    # unweighted mean of the last row would be (30 + 60 + 90) / 3 = 60, not 75
    assert M.last_accuracy(R, counts) != pytest.approx(np.mean(R[2]))


def test_stage_accuracies_equal_counts_is_plain_mean():
    R = [[80, 0], [40, 60]]
    # A_1 = (40 + 60) / 2 = 50
    np.testing.assert_allclose(M.stage_accuracies(R, [5, 5]), [80, 50])


# --- forgetting --------------------------------------------------------------------------------------

def test_forgetting_max_not_on_diagonal():
    R = [[50, NAN, NAN],
         [70, 80, NAN],   # task 0 rises to 70 after stage 1 ...
         [40, 75, 90]]    # ... then falls to 40
    # task 0: max(50, 70, 40) - 40 = 30   (peak is off-diagonal)
    # task 1: max(80, 75) - 75 = 5
    # F = (30 + 5) / 2 = 17.5
    assert M.forgetting(R) == pytest.approx(17.5)
    # BWT uses the diagonal instead: ((40-50) + (75-80)) / 2 = -7.5
    assert M.backward_transfer(R) == pytest.approx(-7.5)


def test_forgetting_zero_when_accuracy_only_increases():
    R = [[50, NAN, NAN],
         [60, 70, NAN],
         [65, 80, 90]]
    # task 0: max(50, 60, 65) - 65 = 0 ; task 1: max(70, 80) - 80 = 0 -> F = 0, never negative
    assert M.forgetting(R) == 0.0
    # BWT is positive: ((65-50) + (80-70)) / 2 = 12.5
    assert M.backward_transfer(R) == pytest.approx(12.5)


def test_bwt_negative_when_forgetting():
    R = [[90, NAN], [70, 85]]
    # BWT = 70 - 90 = -20 ; F = 90 - 70 = 20
    assert M.backward_transfer(R) == pytest.approx(-20.0)
    assert M.forgetting(R) == pytest.approx(20.0)


# --- forward transfer --------------------------------------------------------------------------------

def test_forward_transfer_with_baseline():
    R = [[80, 20, 15],
         [70, 85, 30],
         [60, 75, 90]]
    baseline = [10, 10, 10]
    # j=1: R[0,1] - b[1] = 20 - 10 = 10 ; j=2: R[1,2] - b[2] = 30 - 10 = 20 -> FWT = 15
    assert M.forward_transfer(R, baseline) == pytest.approx(15.0)
    # baseline[0] is unused, may be NaN
    assert M.forward_transfer(R, [NAN, 10, 10]) == pytest.approx(15.0)


def test_forward_transfer_rejects_nan_superdiagonal():
    R = [[80, NAN], [70, 85]]
    with pytest.raises(ValueError, match="R\\[j-1, j\\]"):
        M.forward_transfer(R, [10, 10])


def test_forward_transfer_baseline_length():
    with pytest.raises(ValueError, match="baseline"):
        M.forward_transfer([[80, 20], [70, 85]], [10])


# --- T == 1 ------------------------------------------------------------------------------------------

def test_single_experience():
    R = [[72.5]]
    assert M.stage_accuracies(R, [40]).tolist() == [72.5]
    assert M.average_incremental_accuracy(R, [40]) == 72.5
    assert M.last_accuracy(R, [40]) == 72.5
    assert M.forgetting(R) == 0.0
    assert M.backward_transfer(R) == 0.0
    assert M.forward_transfer(R, [10]) == 0.0
    s = M.summarize(R, [40], baseline=[10])
    assert s["fwt"] == 0.0 and s["stage_acc"] == [72.5]


# --- NaN upper triangle ------------------------------------------------------------------------------

def test_nan_upper_triangle_accepted_except_fwt():
    R = [[90, NAN, NAN],
         [60, 80, NAN],
         [30, 60, 90]]
    counts = [10, 30, 60]
    for value in (M.average_incremental_accuracy(R, counts), M.last_accuracy(R, counts),
                  M.forgetting(R), M.backward_transfer(R)):
        assert math.isfinite(value)
    assert np.all(np.isfinite(M.stage_accuracies(R, counts)))
    with pytest.raises(ValueError):
        M.forward_transfer(R, [0, 0, 0])


def test_nan_in_lower_triangle_rejected():
    with pytest.raises(ValueError, match="below the diagonal"):
        M.forgetting([[90, NAN], [NAN, 80]])


# --- accuracy matrix from counts ---------------------------------------------------------------------

def test_accuracy_matrix_from_counts():
    correct = [[9, 0], [6, 15]]
    counts = [10, 20]
    # [[9/10, 0/20], [6/10, 15/20]] * 100 = [[90, 0], [60, 75]]
    np.testing.assert_allclose(M.accuracy_matrix_from_counts(correct, counts), [[90, 0], [60, 75]])


# --- summarize ---------------------------------------------------------------------------------------

def test_summarize_keys_and_json():
    R = [[80, 20, 15],
         [70, 85, 30],
         [60, 75, 90]]
    counts = [10, 30, 60]
    s = M.summarize(R, counts)
    assert set(s) == {"avg_incremental_acc", "last_acc", "forgetting", "bwt", "stage_acc"}
    # A = [80, (700+2550)/40 = 81.25, (600+2250+5400)/100 = 82.5]; AIA = 243.75/3 = 81.25
    assert s["stage_acc"] == pytest.approx([80, 81.25, 82.5])
    assert s["avg_incremental_acc"] == pytest.approx(81.25)
    assert s["last_acc"] == pytest.approx(82.5)
    # F = ((80-60) + (85-75)) / 2 = 15 ; BWT = -15
    assert s["forgetting"] == pytest.approx(15.0)
    assert s["bwt"] == pytest.approx(-15.0)
    assert all(type(v) is float for k, v in s.items() if k != "stage_acc")
    assert all(type(v) is float for v in s["stage_acc"])
    json.dumps(s)

    with_fwt = M.summarize(R, counts, baseline=[10, 10, 10])
    assert with_fwt["fwt"] == pytest.approx(15.0)
    json.dumps(with_fwt)


def test_summarize_omits_fwt_when_future_not_evaluated():
    R = [[90, NAN], [60, 80]]
    s = M.summarize(R, [10, 10], baseline=[10, 10])
    assert "fwt" not in s
    json.dumps(s)


# --- harmonic mean -----------------------------------------------------------------------------------

def test_harmonic_mean():
    # 2*60*40 / 100 = 48
    assert M.harmonic_mean(60, 40) == pytest.approx(48.0)
    assert M.harmonic_mean(0, 0) == 0.0
    assert M.harmonic_mean(0, 50) == 0.0


# --- validation --------------------------------------------------------------------------------------

@pytest.mark.parametrize("R", [[[1, 2, 3], [4, 5, 6]], [1, 2, 3], []])
def test_non_square_rejected(R):
    with pytest.raises(ValueError, match="square"):
        M.forgetting(R)


def test_counts_length_rejected():
    with pytest.raises(ValueError, match="length T=2"):
        M.stage_accuracies([[90, NAN], [60, 80]], [10, 20, 30])
    with pytest.raises(ValueError, match="length T=2"):
        M.accuracy_matrix_from_counts([[9, 0], [6, 15]], [10])


def test_nonpositive_counts_rejected():
    with pytest.raises(ValueError, match="positive"):
        M.stage_accuracies([[90, NAN], [60, 80]], [0, 20])


# --- property ----------------------------------------------------------------------------------------

@st.composite
def lower_triangular(draw):
    T = draw(st.integers(1, 6))
    R = draw(arrays(float, (T, T), elements=st.floats(0, 100)))
    R[np.triu_indices(T, k=1)] = np.nan
    counts = draw(st.lists(st.integers(1, 1000), min_size=T, max_size=T))
    return R, counts


@settings(max_examples=200, deadline=None)
@given(lower_triangular())
def test_property_forgetting_nonnegative_and_last_is_final_stage(data):
    R, counts = data
    assert M.forgetting(R) >= 0.0
    assert M.last_accuracy(R, counts) == M.stage_accuracies(R, counts)[-1]

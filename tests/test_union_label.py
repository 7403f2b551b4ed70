"""X-TAIL metrics, checked by hand on a 3 x 3 matrix."""
import math

import pytest

from scenarios.union_label_metrics import average, last, transfer, xtail_summary

A = [[50.0, 10.0, 20.0],
     [40.0, 60.0, 30.0],
     [30.0, 50.0, 90.0]]


def test_transfer_is_strict_upper_triangle():
    assert transfer(A) == pytest.approx((10 + 20 + 30) / 3)


def test_average_and_last():
    assert average(A) == pytest.approx(380 / 9)
    assert last(A) == pytest.approx((30 + 50 + 90) / 3)
    assert xtail_summary(A)["last"] == pytest.approx(170 / 3)


def test_single_dataset_and_bad_shape():
    assert math.isnan(transfer([[70.0]]))
    with pytest.raises(ValueError, match="square"):
        average([[1.0, 2.0]])

"""X-TAIL metrics, checked by hand on a 3 x 3 and a 4 x 4 matrix (Transfer as XTAIL/main.py:189-192)."""
import math

import pytest

from cl.engine.kind_metrics import average, last, transfer, xtail_summary

pytestmark = pytest.mark.unit

A = [[50.0, 10.0, 20.0],
     [40.0, 60.0, 30.0],
     [30.0, 50.0, 90.0]]


def test_transfer_is_the_mean_of_column_means_over_earlier_rows():
    # column 1: rows 0 -> 10; column 2: rows 0, 1 -> (20 + 30) / 2 = 25; Transfer = (10 + 25) / 2
    assert transfer(A) == pytest.approx((10 + 25) / 2)


# The 4 x 4 example: the flat mean of the 6 strict-upper cells is 444 / 6 = 74.00; X-TAIL takes column
# means first: column 1 -> 59, column 2 -> (70 + 75) / 2 = 72.5, column 3 -> (80 + 80 + 80) / 3 = 80; Transfer =
# (59 + 72.5 + 80) / 3 = 70.50.
B = [[90.0, 59.0, 70.0, 80.0],
     [85.0, 88.0, 75.0, 80.0],
     [84.0, 86.0, 92.0, 80.0],
     [83.0, 85.0, 90.0, 95.0]]


def test_xtail_metrics_on_a_hand_computed_4x4_matrix():
    s = xtail_summary(B)
    assert s["transfer"] == pytest.approx(70.50)
    assert sum(B[i][j] for i in range(4) for j in range(i + 1, 4)) / 6 == pytest.approx(74.00)  # the old formula
    assert s["average"] == pytest.approx(1322 / 16)  # row sums 299 + 328 + 342 + 353
    assert s["last"] == pytest.approx((83 + 85 + 90 + 95) / 4)


def test_transfer_masks_exact_zero_cells_as_the_reference_and_can_keep_them():
    z = [row[:] for row in B]
    z[0][2] = 0.0  # a genuine 0% zero-shot cell: the reference (np.ma.masked_equal(., 0)) drops it
    assert transfer(z) == pytest.approx((59 + 75 + 80) / 3)
    assert transfer(z, mask_zeros=False) == pytest.approx((59 + 37.5 + 80) / 3)
    z[0][1] = 0.0  # a column with no cell left does not count
    assert transfer(z) == pytest.approx((75 + 80) / 2)


def test_average_and_last():
    assert average(A) == pytest.approx(380 / 9)
    assert last(A) == pytest.approx((30 + 50 + 90) / 3)
    assert xtail_summary(A)["last"] == pytest.approx(170 / 3)


def test_single_dataset_and_bad_shape():
    assert math.isnan(transfer([[70.0]]))
    with pytest.raises(ValueError, match="square"):
        average([[1.0, 2.0]])


def test_union_label_stream_offsets_labels_and_keeps_all_names():
    from scenarios.kinds.union_label import build_union_label

    spec = dict(image_size=32, train_per_class=4, test_per_class=2, noise=0.1)
    stream = build_union_label({"name": "u", "datasets": [
        {"class_names": ["a", "b"], "seed": 1, **spec}, {"class_names": ["c", "d", "e"], "seed": 2, **spec}]})
    assert stream.info.n_classes == 5 and stream.info.class_names == ["a", "b", "c", "d", "e"]
    assert stream.info.classes_per_experience == [[0, 1], [2, 3, 4]]
    assert set(int(t) for t in stream[1].test.targets) == {2, 3, 4}


def test_kind_metrics_from_history_reads_the_padded_matrix():
    from types import SimpleNamespace

    from cl.engine.kind_metrics import union_label as from_history

    out = from_history(SimpleNamespace(acc_matrix=[[50.0, 10.0, 20.0], [40.0, 60.0, 30.0]]))
    assert out["transfer"] == pytest.approx(10.0) and out["last"] == pytest.approx(50.0)
    assert out["average"] == pytest.approx(40.0)

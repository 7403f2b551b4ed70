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


def test_union_label_stream_offsets_labels_and_keeps_all_names():
    from scenarios.union_label import build_union_label

    spec = dict(image_size=32, train_per_class=4, test_per_class=2, noise=0.1)
    stream = build_union_label({"name": "u", "datasets": [
        {"class_names": ["a", "b"], "seed": 1, **spec}, {"class_names": ["c", "d", "e"], "seed": 2, **spec}]})
    assert stream.info.n_classes == 5 and stream.info.class_names == ["a", "b", "c", "d", "e"]
    assert stream.info.classes_per_experience == [[0, 1], [2, 3, 4]]
    assert set(int(t) for t in stream[1].test.targets) == {2, 3, 4}


def test_kind_metrics_from_history_reads_the_padded_matrix():
    from types import SimpleNamespace

    from scenarios.union_label_metrics import from_history

    out = from_history(SimpleNamespace(acc_matrix=[[50.0, 10.0, 20.0], [40.0, 60.0, 30.0]]))
    assert out["transfer"] == pytest.approx(10.0) and out["last"] == pytest.approx(50.0)
    assert out["average"] == pytest.approx(40.0)

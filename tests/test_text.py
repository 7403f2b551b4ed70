"""The text scenario kind (issue 7): synthetic-text stream, IDBR CSV/JSONL reader, orders, sampling, errors."""
import json

import numpy as np
import pytest

from cl.engine.errors import ConfigError, DatasetError
from scenarios.kinds.text import ORDERS, build_text

pytestmark = pytest.mark.unit


def write_idbr(root, names=("ag", "yelp", "amazon", "dbpedia", "yahoo"), per_class=10, jsonl=()):
    sizes = {"ag": 4, "yelp": 5, "amazon": 5, "dbpedia": 14, "yahoo": 10}
    for name in names:
        (root / name).mkdir(parents=True)
        for split in ("train", "test"):
            rows = [(c + 1, f"title {c}", f"{name} {split} text {i} of class {c}")
                    for c in range(sizes[name]) for i in range(per_class)]
            if name in jsonl:
                (root / name / f"{split}.jsonl").write_text(
                    "".join(json.dumps({"label": c, "text": t}) + "\n" for c, _, t in rows))
            else:
                (root / name / f"{split}.csv").write_text("".join(f'{c},"{ti}","{t}"\n' for c, ti, t in rows))


def test_synthetic_text_stream_through_compose(compose):
    import scenarios

    cfg = compose("scenario=synthetic-text", "debug=fast")
    stream = scenarios.build(cfg["scenario"], cfg["data_root"])
    assert stream.info.kind == "text" and stream.info.n_classes == 6 and len(stream) == 3
    assert stream.info.classes_per_experience == [[0, 1], [2, 3], [4, 5]]
    text, y = stream[1].train[0]
    assert isinstance(text, str) and y in (2, 3)
    assert len(stream[0].train) == 32 and len(stream[0].test) == 32  # limit_per_class 16 in both splits
    reordered = build_text({**cfg["scenario"], "tasks": ["science", "sports", "food"]})
    assert reordered.info.classes_per_experience == [[4, 5], [0, 1], [2, 3]]  # ids fixed whatever the order


def test_idbr_reader_orders_shared_label_space_and_sampling(tmp_path):
    write_idbr(tmp_path / "idbr", jsonl=("yahoo",))
    s = build_text({"dataset": "idbr", "order": 4}, tmp_path)
    assert s.info.extra["tasks"] == ORDERS["4"] == ["ag", "yelp", "amazon", "yahoo", "dbpedia"]
    assert s.info.n_classes == 33  # 4 + 5 (yelp and amazon share) + 14 + 10
    assert s[1].classes == s[2].classes == [4, 5, 6, 7, 8]
    assert s[0].train[0] == ("ag train text 0 of class 0", 0)  # the content column, label 1-based -> 0
    assert np.bincount(s[3].train.targets)[-10:].tolist() == [10] * 10  # yahoo from JSONL
    k = build_text({"dataset": "idbr", "tasks": ["ag_news", "dbpedia"], "k_samples": 7}, tmp_path)
    assert k.info.n_classes == 18
    assert np.bincount(k[0].train.targets).tolist() == [7] * 4
    assert np.bincount(k[0].test.targets).tolist() == [1] * 4  # int(0.15 * 7) test samples per class


def test_idbr_errors_name_the_fix(tmp_path):
    with pytest.raises(DatasetError, match=r"missing .*ag/train.csv(.|\n)*expected layout(.|\n)*dbpedia/"):
        build_text({"dataset": "idbr", "order": 4}, tmp_path)
    write_idbr(tmp_path / "idbr", names=("ag",))
    (tmp_path / "idbr" / "ag" / "test.csv").write_text('9,"t","x"\n')
    with pytest.raises(DatasetError, match=r"test.csv:1: label 9 is outside 1..4"):
        build_text({"dataset": "idbr", "tasks": ["ag"]}, tmp_path)
    with pytest.raises(ConfigError, match="SLM's TASK_LIST"):
        build_text({"dataset": "idbr", "order": 9}, tmp_path)
    with pytest.raises(ConfigError, match="at most once"):
        build_text({"dataset": "idbr", "tasks": ["ag", "imdb"]}, tmp_path)
    with pytest.raises(ConfigError, match="synthetic-text or idbr"):
        build_text({"dataset": "imdb"}, tmp_path)

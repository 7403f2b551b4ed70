"""Few-shot class-incremental streams: the seeded generator, the CEC/FACT session-list format (integer and path
lines), the errors for missing or mismatched lists, and fsa / adam end to end on synthetic-fscil."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import scenarios
from cl.app.cli import compose_config
from cl.engine.errors import ConfigError, DatasetError
from scenarios import make_synthetic
from scenarios.kinds.fscil import fscil, read_index_files, write_index_files
from scenarios.datasets.imagefolder import read_imagefolder_split

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def data():
    return make_synthetic(n_classes=12, train_per_class=20, test_per_class=6, seed=3)


def train_indices(exp):
    return exp.train.indices.tolist()


def test_generator_base_session_takes_every_base_sample_and_k_shots_per_new_class(data):
    train, test = data
    s = fscil(train, test, base_classes=6, ways=2, shots=5, sessions=3, seed=7)
    assert len(s) == 4 and s.info.kind == "fscil" and s.info.n_classes == 12
    assert s.info.classes_per_experience == [[0, 1, 2, 3, 4, 5], [6, 7], [8, 9], [10, 11]]
    assert sorted(train_indices(s[0])) == np.flatnonzero(train.targets < 6).tolist()
    for k, exp in enumerate(s):
        assert exp.kind == "fscil" and exp.task_id == k
        counts = np.bincount(exp.train.targets, minlength=12)
        if k:
            assert counts[exp.classes].tolist() == [5, 5] and counts.sum() == 10
        # test: every test image of the session's classes
        assert sorted(exp.test.indices.tolist()) == np.flatnonzero(np.isin(test.targets, exp.classes)).tolist()
    assert s.info.extra["few_shot_indices"] == [train_indices(e) for e in s[1:]]


def test_generator_is_seeded(data):
    train, test = data
    a, b, c = (fscil(train, test, 6, 2, 5, 3, seed=seed) for seed in (1, 1, 2))
    assert [train_indices(e) for e in a] == [train_indices(e) for e in b]
    assert [train_indices(e) for e in a[1:]] != [train_indices(e) for e in c[1:]]


def test_generator_rejects_too_many_classes_or_shots(data):
    train, test = data
    with pytest.raises(ConfigError, match="12"):
        fscil(train, test, base_classes=6, ways=2, shots=5, sessions=4, seed=0)
    with pytest.raises(DatasetError, match="fewer than 30 shots"):
        fscil(train, test, base_classes=6, ways=2, shots=30, sessions=1, seed=0)


def test_synthetic_fscil_config_builds_the_test_sized_stream():
    cfg = compose_config(["scenario=synthetic-fscil", "debug=fast"])
    s = scenarios.build(cfg["scenario"])
    assert [len(c) for c in s.info.classes_per_experience] == [10, 2, 2, 2, 2, 2]
    assert s.info.extra["n_train"] == [160, 10, 10, 10, 10, 10]  # debug cuts the base session, never the shots
    assert s.info.extra["source"] == "generated"
    with pytest.raises(ConfigError, match="fscil"):
        scenarios.build({**cfg["scenario"], "kind": "fscl"})


def test_index_files_with_sample_indices_round_trip(data, tmp_path):
    """The format CEC uses for CIFAR-100: one training-sample index per line."""
    train, test = data
    generated = fscil(train, test, 6, 2, 5, 3, seed=5)
    files = write_index_files(tmp_path / "lists", [e.train.indices for e in generated])
    assert [f.name for f in files] == ["session_1.txt", "session_2.txt", "session_3.txt", "session_4.txt"]
    assert files[1].read_text().splitlines()[0].isdigit()
    cfg = {"name": "syn", "dataset": "synthetic", "kind": "fscil",
           "synthetic": {"n_classes": 12, "train_per_class": 20, "test_per_class": 6, "seed": 3},
           "fscil": {"base_classes": 6, "ways": 2, "shots": 5, "sessions": 3, "index_dir": "lists"}}
    read = scenarios.build(cfg, data_root=tmp_path)  # index_dir relative to the data root
    assert [train_indices(e) for e in read] == [train_indices(e) for e in generated]
    assert read.info.extra["source"] == "index_files"
    # the configured numbers are checked against the files
    with pytest.raises(DatasetError, match="fscil.ways is 3"):
        scenarios.build({**cfg, "fscil": {**cfg["fscil"], "ways": 3}}, data_root=tmp_path)
    with pytest.raises(DatasetError, match="session_5.txt is missing"):
        scenarios.build({**cfg, "fscil": {**cfg["fscil"], "sessions": 4}}, data_root=tmp_path)


def test_missing_index_files_name_the_expected_layout(tmp_path):
    cfg = compose_config(["scenario=synthetic-fscil", "scenario.fscil.index_dir=index_list/synthetic"])
    with pytest.raises(DatasetError) as err:
        scenarios.build(cfg["scenario"], data_root=tmp_path)
    message = str(err.value)
    assert "session_1.txt" in message and "expected layout" in message and "CEC" in message
    assert str(tmp_path / "index_list" / "synthetic") in message


def make_tree(root, classes, per_class):
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), (i * 20, 40, 80)).save(root / split / c / f"{c}_{i:04d}.png")


def test_image_path_lines_are_matched_by_class_folder_and_file(tmp_path):
    """The format of CEC's CUB-200 / miniImageNet lists: paths whose prefix differs from the local tree."""
    classes = ["001.Albatross", "002.Auklet", "003.Blackbird", "004.Bunting"]
    make_tree(tmp_path / "birds", classes, per_class=4)
    train, test = read_imagefolder_split(tmp_path / "birds", image_size=8, augment="none")
    lists = tmp_path / "lists"
    lists.mkdir()
    base = [f"CUB_200_2011/images/{c}/{c}_{i:04d}.png" for c in classes[:2] for i in range(4)]
    (lists / "session_1.txt").write_text("\n".join(base) + "\n")
    (lists / "session_2.txt").write_text("# a comment\n\nCUB_200_2011/images/003.Blackbird/003.Blackbird_0002.png\n"
                                         "CUB_200_2011/images/004.Bunting/004.Bunting_0000.png\n")
    sessions = read_index_files(lists, train)
    assert [train.samples[i][0].split("/")[-1] for i in sessions[1]] == ["003.Blackbird_0002.png",
                                                                          "004.Bunting_0000.png"]
    cfg = {"name": "birds", "dataset": "imagefolder", "root": str(tmp_path / "birds"), "kind": "fscil",
           "image_size": 8, "augment": "none", "fscil": {"index_dir": str(lists), "ways": 2, "shots": 1}}
    s = scenarios.build(cfg)
    assert s.info.classes_per_experience == [[0, 1], [2, 3]] and len(s[0].train) == 8 and len(s[1].test) == 8
    (lists / "session_2.txt").write_text("CUB_200_2011/images/003.Blackbird/missing.png\n")
    with pytest.raises(DatasetError, match="003.Blackbird/missing.png"):
        scenarios.build(cfg)


def test_strategies_without_fscil_support_are_rejected_before_any_work(compose, run_quiet):
    with pytest.raises(ConfigError, match="fsa"):
        run_quiet(compose("strategy=finetune", "scenario=synthetic-fscil", "debug=fast"))


@pytest.mark.e2e
@pytest.mark.parametrize("strategy", ["fsa", "adam"])
def test_fsa_and_adam_run_on_synthetic_fscil(compose, run_quiet, strategy):
    path, _ = run_quiet(compose(f"strategy={strategy}", "scenario=synthetic-fscil", "backbone=vit-tiny",
                                "debug=fast"))
    r = json.loads(path.read_text())
    assert r["status"] == "finished" and r["stream"]["kind"] == "fscil"
    stage = r["metrics"]["stage_acc"]  # accuracy over every class seen so far, after each session
    assert len(stage) == 6 and len(r["acc_matrix"]) == 6
    assert r["test_counts"] == [160, 32, 32, 32, 32, 32]
    assert min(stage) > 3 * 100 / 20  # well above chance over the 20 classes
    assert torch.isclose(torch.tensor(stage[-1]), torch.tensor(r["metrics"]["last_acc"]))

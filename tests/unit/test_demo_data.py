"""The demo tasks' committed data is exactly what the generator makes, and the held-out split is unseen."""

from __future__ import annotations

from reap.demo import TASKS, answer_of, make_task_rows, prompt_of, read_task_rows, write_task_data
from reap.resources import data_dir


def test_committed_data_matches_the_generator(tmp_path):
    write_task_data(tmp_path)
    committed = data_dir("evals") / "demo" / "data"
    for f in sorted(tmp_path.iterdir()):
        assert f.read_text() == (committed / f.name).read_text(), f"{f.name} differs: rerun write_task_data"


def test_heldout_split_is_disjoint_and_balanced():
    rows = make_task_rows()
    train = {prompt_of("larger", r) for r in rows["larger"]["train"]}
    assert not train & {prompt_of("larger", r) for r in rows["larger"]["test"]}
    words = {r["word"] for r in rows["reverse"]["train"]}
    assert not words & {r["word"] for r in rows["reverse"]["test"]}
    labels = [r["label"] for r in read_task_rows("larger", "test")]
    assert 0.4 < sum(labels) / len(labels) < 0.6  # chance is 50%


def test_answers():
    assert answer_of("larger", {"a": 47, "b": 82}) == " 82"
    assert answer_of("reverse", {"word": "kbtrx"}) == " xrtbk"
    assert set(TASKS) == {"larger", "reverse"}

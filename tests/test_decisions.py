"""The decision leaf: the F1-adaptive threshold of val rows, and the threshold a part records."""

import numpy as np

from rayanom.decisions import Threshold, f1_adaptive_threshold, from_key, key_of, val_threshold


def test_val_threshold_is_the_f1_threshold_with_the_rows_range():
    labels = np.array([0, 0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.4, 0.2, 0.9, 0.35, 0.5, 0.8])
    t = val_threshold(labels, scores)
    assert t == Threshold(f1_adaptive_threshold(labels, scores), 0.1, 0.9, "F1-adaptive on 7 val rows")
    assert val_threshold(np.zeros(3, int), scores[:3]) is None  # one class: no threshold


def test_a_part_records_its_threshold():
    t = Threshold(1.5, -2.0, 3.0, "F1-adaptive on 10 val rows")
    assert from_key(key_of(t)) == Threshold(1.5, -2.0, 3.0)  # the value and statistics; not the source
    assert key_of(None) == b"null" and from_key(b"null") is None

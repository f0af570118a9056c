from collections import Counter

from trainer.splits import SplitSpec, split_groups


def test_grouped_stratified_and_deterministic():
    groups, labels = [], []
    for g in range(300):
        label = 0 if g % 25 == 0 else 1
        for _ in range(1 + g % 4):
            groups.append(f"P{g}")
            labels.append(label)
    a = split_groups(groups, labels, SplitSpec(seed=1))
    b = split_groups(groups, labels, SplitSpec(seed=1))
    assert a == b
    by_group = {}
    for g, s in zip(groups, a):
        assert by_group.setdefault(g, s) == s  # a patient is never on two sides
    counts = Counter(a)
    n = len(groups)
    assert abs(counts["train"] / n - 0.7) < 0.05
    for split in ("validation", "test"):
        ys = [y for y, s in zip(labels, a) if s == split]
        assert 0 in ys and 1 in ys
    assert split_groups(groups, labels, SplitSpec(seed=2)) != a

"""Proxy splits: seeded, disjoint, sized as asked, drawn from the ids given (the training split)."""
import pytest

from detector.errors import UserError
from proxy_eval.splits import ProxySplits, SplitError, make_splits

TRAIN_IDS = list(range(100, 160))


def test_same_seed_same_split_and_another_seed_another():
    first = make_splits(TRAIN_IDS, 20, 10, seed=3)
    assert make_splits(list(reversed(TRAIN_IDS)), 20, 10, seed=3) == first  # input order is irrelevant
    assert make_splits(TRAIN_IDS, 20, 10, seed=4) != first


def test_splits_are_disjoint_sized_and_drawn_from_the_given_ids_only():
    splits = make_splits(TRAIN_IDS, 25, 15, seed=0)
    assert len(splits.train_ids) == 25 and len(splits.val_ids) == 15
    assert not set(splits.train_ids) & set(splits.val_ids)
    assert set(splits.train_ids) | set(splits.val_ids) <= set(TRAIN_IDS)


def test_growing_the_train_list_keeps_the_val_list():
    small, large = make_splits(TRAIN_IDS, 10, 12, seed=1), make_splits(TRAIN_IDS, 40, 12, seed=1)
    assert small.val_ids == large.val_ids
    assert set(small.train_ids) < set(large.train_ids)


def test_train_images_none_takes_every_remaining_image():
    splits = make_splits(TRAIN_IDS, None, 10, seed=0)
    assert len(splits.train_ids) == len(TRAIN_IDS) - 10


@pytest.mark.parametrize("train, val", [(50, 20), (0, 5), (5, 0)])
def test_sizes_that_do_not_fit_raise_a_user_error_naming_the_key(train, val):
    with pytest.raises(SplitError, match="proxy_eval") as info:
        make_splits(TRAIN_IDS, train, val, seed=0)
    assert isinstance(info.value, UserError)


def test_overlapping_lists_are_rejected():
    with pytest.raises(ValueError, match="overlap"):
        ProxySplits(train_ids=(1, 2), val_ids=(2, 3), seed=0)

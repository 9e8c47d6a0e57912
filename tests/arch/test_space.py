"""Search space: decisions, encode/decode, exact size, stages, sampling and mutation."""
import itertools
import random

import pytest

from detector.arch.grammar import ArchError, FCOSHead, StandardFPN
from detector.arch.zoo import zoo_arch
from detector.arch.space import SearchSpace


def test_decision_layout_of_the_default_space():
    space = SearchSpace("joint")
    assert len(space.decisions) == 7 * 5 + 7
    inputs = [d for d in space.decisions if d.kind == "input"]
    assert [d.num_choices for d in inputs] == [n for n in range(3, 10) for _ in range(2)]
    assert space.max_choices() == {"input": 9, "fpn_op": 5, "agg": 2, "share": 7, "head_op": 6}


def test_sizes_match_the_design_figures():
    fpn = SearchSpace("fpn")
    assert fpn.total_size() == (3 * 4 * 5 * 6 * 7 * 8 * 9) ** 2 * 50 ** 7  # about 2.6e22
    assert 2.5e22 < fpn.total_size() < 2.7e22
    head = SearchSpace("head", fixed_fpn=StandardFPN())
    assert head.size() == 6 ** 6 * 7 == 326_592


@pytest.mark.parametrize("levels, blocks", [(("c3", "c4", "c5"), 3), (("c2", "c3", "c4", "c5"), 3), (("c4", "c5"), 4)])
def test_exact_valid_size_equals_brute_force_count(levels, blocks):
    space = SearchSpace("fpn", levels=levels, num_blocks=blocks, fpn_ops=("skip",), aggregations=("sum",))
    brute = sum(space.is_valid(t) for t in itertools.product(*(range(d.num_choices) for d in space.decisions)))
    assert space.size() == brute
    assert space.size() < space.total_size()


def test_encode_decode_inverse_and_stage_subspaces():
    nasfcos = zoo_arch("nasfcos")
    joint = SearchSpace("joint")
    assert joint.decode(joint.encode(nasfcos)) == nasfcos
    fpn_stage = SearchSpace("fpn")
    fpn_only = zoo_arch("nasfcos-fpn")
    assert fpn_stage.decode(fpn_stage.encode(fpn_only)) == fpn_only
    assert all(d.name.startswith("fpn.") for d in fpn_stage.decisions)
    with pytest.raises(ArchError):
        fpn_stage.encode(nasfcos)  # head is not the fixed head:fcos
    head_stage = SearchSpace("head", fixed_fpn=nasfcos.fpn)
    assert [d.kind for d in head_stage.decisions] == ["share"] + ["head_op"] * 6
    assert head_stage.decode(head_stage.encode(nasfcos)) == nasfcos
    with pytest.raises(ArchError, match="needs a fixed FPN"):
        SearchSpace("head")


def test_space_options_restrict_codes():
    small = SearchSpace("fpn", fpn_ops=("sep3", "skip"))
    with pytest.raises(ArchError, match="not in this space"):
        small.encode(zoo_arch("nasfcos-fpn"))  # uses dcn
    with_c2 = SearchSpace("fpn", levels=("c2", "c3", "c4", "c5"))
    assert with_c2.decisions[0].choices == ("c2", "c3", "c4", "c5")
    with pytest.raises(ArchError, match="space.levels"):
        SearchSpace("fpn", levels=("c6",))


def test_sampling_is_seeded_and_valid_and_mutation_changes_one_decision():
    space = SearchSpace("joint")
    a = [space.sample_tokens(random.Random(3)) for _ in range(2)]
    assert a[0] == a[1]
    rng = random.Random(4)
    for _ in range(500):
        tokens = space.sample_tokens(rng)
        assert space.is_valid(tokens)
        child = space.mutate(tokens, rng)
        assert space.is_valid(child)
        assert sum(x != y for x, y in zip(tokens, child)) == 1


def test_decode_rejects_out_of_range_tokens():
    space = SearchSpace("fpn")
    tokens = list(space.sample_tokens(random.Random(0)))
    tokens[0] = 3  # block 0 pool has only c3, c4, c5
    with pytest.raises(ArchError, match="fpn.b0.in1"):
        space.decode(tokens)
    assert isinstance(space.decode(space.sample_tokens(random.Random(0))).head, FCOSHead)

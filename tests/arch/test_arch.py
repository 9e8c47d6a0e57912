"""Architecture codes: round trips, validation messages, zoo facts, fuzzing, torch-free import."""
import random
import string
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detector.arch.grammar import ArchError, FCOSHead, SearchedFPN, SearchedHead, StandardFPN, parse
from detector.arch.zoo import ZOO, resolve_arch, zoo_arch
from detector.arch.space import SearchSpace

JOINT = SearchSpace("joint")


def test_round_trip_holds_for_10000_random_codes():
    rng = random.Random(0)
    for _ in range(10_000):
        arch = JOINT.sample(rng)
        text = str(arch)
        assert parse(text) == arch
        assert set(text) <= set(string.ascii_lowercase + string.digits + ":/+-.")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_round_trip_property_over_token_sequences(data):
    tokens = tuple(data.draw(st.integers(0, d.num_choices - 1)) for d in JOINT.decisions)
    if not JOINT.is_valid(tokens):
        with pytest.raises(ArchError):
            JOINT.decode(tokens)
        return
    arch = JOINT.decode(tokens)
    assert parse(str(arch)) == arch
    assert JOINT.encode(arch) == tokens
    assert hash(arch) == hash(parse(str(arch)))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_entries_round_trip(name):
    arch = zoo_arch(name)
    assert parse(str(arch)) == arch
    assert resolve_arch(name) == arch
    assert resolve_arch(str(arch)) == arch


def test_named_parts():
    arch = zoo_arch("fcos")
    assert arch.fpn == StandardFPN() and arch.head == FCOSHead()
    assert str(arch) == "fpn:standard+head:fcos"
    mixed = zoo_arch("nasfcos-fpn")
    assert isinstance(mixed.fpn, SearchedFPN) and mixed.head == FCOSHead()


def test_published_fpn_outputs_follow_design_section_4():
    fpn = zoo_arch("nasfcos").fpn
    plan = fpn.outputs()
    strides = fpn.strides()
    assert (plan.p5, plan.p4, plan.p3, plan.extras) == (4, 5, 6, (2,))
    assert strides[4] == 32 and strides[2] == 32  # P5 = B4 + B2 at stride 32
    assert strides[5] == 8  # P4 computed at stride 8, resized to C4
    assert strides[6] == 8  # P3 = B6 + up(B2)
    assert sum(op == "dcn" for b in fpn.blocks for op in b.ops) == 12
    head = zoo_arch("nasfcos").head
    assert head == SearchedHead(share=0, ops=("dcn", "conv3", "dcn", "conv1", "skip", "skip"))


GOOD_FPN = "c5-c5-dcn-dcn-cat/c5-c5-dcn-dcn-cat/b0-c5-dcn-skip-cat/c3-c5-dcn-skip-cat/b1-c5-dcn-dcn-cat/b0-b3-dcn-dcn-cat/b3-c4-dcn-dcn-cat"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("x" * 5000, "at most"),
        ("fpn:standard+head:fcosé", "non-ASCII"),
        ("fpn:standard+head:FCOS", "not allowed"),
        ("fpn:standard", "one '+'"),
        ("fpn:standard+head:fcos+head:fcos", "one '+'"),
        ("head:fcos+fpn:standard", "must start with 'fpn:'"),
        ("fpn:standard+fcos", "must start with 'head:'"),
        (f"fpn:{GOOD_FPN}/+head:fcos", "stray '/'"),
        (f"fpn:{GOOD_FPN.replace('b3-c4', 'b7-c4')}+head:fcos", "block 6 input 0 'b7' refers to a later block"),
        (f"fpn:{GOOD_FPN.replace('b1-c5', 'b4-c5')}+head:fcos", "block 4 input 0 'b4' refers to itself"),
        (f"fpn:{GOOD_FPN.replace('cat/c3', 'max/c3')}+head:fcos", "block 2 aggregation 'max' is unknown"),
        (f"fpn:{GOOD_FPN.replace('b0-c5-dcn-skip', 'b0-c5-dcn-conv9')}+head:fcos", "block 2 op 1 'conv9' is unknown"),
        (f"fpn:{GOOD_FPN.replace('c3-c5', 'c6-c5')}+head:fcos", "block 3 input 0 'c6' is unknown"),
        ("fpn:c3-c4-sep3-skip-sum+head:fcos", "1 blocks given, this search space has 7"),
        ("fpn:c3-c4-sep3-skip+head:fcos", "5 '-'-separated tokens"),
        ("fpn:standard+head:s7-conv3-conv3-conv3-conv3-conv3-conv3", "share index 's7' is out of range"),
        ("fpn:standard+head:s0-conv3-conv3", "2 layers given, this search space has 6"),
        ("fpn:standard+head:s0-conv3-conv3-conv3-conv3-conv3-dcn3", "layer 5 op 'dcn3' is unknown"),
        ("fpn:standard+head:conv3-conv3-conv3-conv3-conv3-conv3", "share index s<k>"),
        ("fpn:standard+head:s0--conv3-conv3-conv3-conv3-conv3", "stray '-'"),
    ],
)
def test_bad_codes_name_the_offending_part(text, fragment):
    with pytest.raises(ArchError) as err:
        parse(text)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_fewer_than_three_unused_outputs_is_rejected():
    # every block reads its predecessor: only the last block is unused
    chain = "/".join(["c3-c4-sep3-skip-sum"] + [f"b{k}-c5-sep3-skip-sum" for k in range(6)])
    with pytest.raises(ArchError, match="only 1 block output"):
        parse(f"fpn:{chain}+head:fcos")


def _mutations(rng: random.Random, text: str) -> str:
    alphabet = string.ascii_lowercase + string.digits + ":/+-.b" + "é\x00 _"
    chars = list(text)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(3)
        pos = rng.randrange(len(chars) + 1)
        if kind == 0:
            chars.insert(pos, rng.choice(alphabet))
        elif kind == 1 and chars:
            del chars[min(pos, len(chars) - 1)]
        elif chars:
            chars[min(pos, len(chars) - 1)] = rng.choice(alphabet)
    return "".join(chars)


def test_fuzz_10000_strings_raise_only_arch_error():
    rng = random.Random(1)
    seeds = [str(JOINT.sample(rng)) for _ in range(50)] + list(ZOO.values())
    outcomes = {"ok": 0, "error": 0}
    for i in range(10_000):
        if i % 4 == 0:
            text = "".join(rng.choice(string.printable) for _ in range(rng.randint(0, 60)))
        else:
            text = _mutations(rng, rng.choice(seeds))
        try:
            arch = parse(text)
        except ArchError as err:
            assert str(err) and "\n" not in str(err)
            outcomes["error"] += 1
        else:
            assert parse(str(arch)) == arch
            outcomes["ok"] += 1
    assert outcomes["error"] > 5000 and outcomes["ok"] > 10


def test_resolve_reads_files_and_run_directories(tmp_path):
    code = str(zoo_arch("nasfcos"))
    (tmp_path / "code.txt").write_text(code + "\n")
    assert str(resolve_arch(str(tmp_path / "code.txt"))) == code
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(ArchError, match="no best.txt"):
        resolve_arch(str(run))
    (run / "best.txt").write_text(code)
    assert str(resolve_arch(str(run))) == code
    (tmp_path / "bad.txt").write_text("fpn:nonsense+head:fcos")
    with pytest.raises(ArchError, match="bad.txt"):
        resolve_arch(str(tmp_path / "bad.txt"))
    with pytest.raises(ArchError, match="neither a zoo name"):
        resolve_arch("resnet")


def test_codes_and_space_import_without_torch():
    code = "import sys, detector.arch.grammar, detector.arch.zoo, detector.arch.space; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)

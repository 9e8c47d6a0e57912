"""The feature cache file format: round trip, checksum, corruption detection, atomic replacement."""
import hashlib

import pytest
import torch

from proxy_eval.feature_cache import (
    CHECKSUM_FILE,
    CorruptCacheError,
    FeatureCache,
    ProxyFeatures,
    SplitFeatures,
    cache_key,
)


def _split(num_images: int, seed: int) -> SplitFeatures:
    g = torch.Generator().manual_seed(seed)
    boxes = [torch.rand(k, 4, generator=g).sort(dim=1).values * 64 for k in (0, 2, 3, 1)[:num_images]]
    boxes = [torch.cat([b[:, :2], b[:, :2] + 1 + b[:, 2:]], dim=1) for b in boxes]  # x2 > x1, y2 > y1
    return SplitFeatures(
        features={"c3": torch.randn(num_images, 8, 8, 8, generator=g).half(),
                  "c5": torch.randn(num_images, 16, 2, 2, generator=g).half()},
        boxes=boxes,
        labels=[torch.randint(0, 3, (len(b),), generator=g) for b in boxes],
        image_ids=[10 * seed + i for i in range(num_images)],
        sizes=[(64, 48 + i) for i in range(num_images)],
    )


def _features() -> ProxyFeatures:
    return ProxyFeatures(train=_split(4, 1), val=_split(3, 2), shapes={"c3": (8, 8), "c5": (16, 32)},
                         resolution=64, num_classes=3)


def _assert_same_split(a: SplitFeatures, b: SplitFeatures) -> None:
    assert a.image_ids == b.image_ids and a.sizes == b.sizes
    for level in a.features:
        assert b.features[level].dtype == torch.float16
        assert torch.equal(a.features[level], b.features[level])
    assert all(torch.equal(x, y) for x, y in zip(a.boxes, b.boxes)) and len(a.boxes) == len(b.boxes)
    assert all(torch.equal(x, y) for x, y in zip(a.labels, b.labels))


def test_write_then_load_gives_back_every_tensor_and_target(tmp_path):
    cache = FeatureCache(tmp_path / "features", "k1")
    original = _features()
    cache.write(original, {"note": "test"})
    loaded = cache.load()
    _assert_same_split(original.train, loaded.train)
    _assert_same_split(original.val, loaded.val)
    assert loaded.shapes == original.shapes and loaded.resolution == 64 and loaded.num_classes == 3
    assert cache.meta()["note"] == "test"
    assert [p.name for p in (tmp_path / "features").iterdir()] == ["k1"], "temporary folders left behind"


def test_the_stored_checksum_is_the_sha256_of_the_tensor_file(tmp_path):
    cache = FeatureCache(tmp_path, "k")
    cache.write(_features(), {})
    digest = hashlib.sha256(cache.tensor_file.read_bytes()).hexdigest()
    assert (cache.path / CHECKSUM_FILE).read_text().split()[0] == digest
    assert cache.meta()["sha256"] == digest


def test_flipped_bytes_are_detected_on_load(tmp_path):
    cache = FeatureCache(tmp_path, "k")
    cache.write(_features(), {})
    data = bytearray(cache.tensor_file.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    cache.tensor_file.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match="sha256"):
        cache.load()
    cache.tensor_file.unlink()
    with pytest.raises(CorruptCacheError):
        cache.verify()


def test_writing_over_a_corrupt_cache_replaces_it(tmp_path):
    cache = FeatureCache(tmp_path, "k")
    cache.write(_features(), {"version": 1})
    cache.tensor_file.write_bytes(b"garbage")
    cache.write(_features(), {"version": 2})
    cache.verify()
    assert cache.meta()["version"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]


def test_cache_key_is_stable_and_sensitive_to_every_value():
    material = {"resolution": 160, "splits": {"train": [1, 2], "val": [3]}, "backbone": "resnet18"}
    reordered = {"backbone": "resnet18", "splits": {"val": [3], "train": [1, 2]}, "resolution": 160}
    assert cache_key(material) == cache_key(reordered)
    assert cache_key({**material, "resolution": 192}) != cache_key(material)
    assert cache_key({**material, "splits": {"train": [1, 4], "val": [3]}}) != cache_key(material)


def test_a_verified_handle_skips_the_second_hash_but_travels_unverified(tmp_path, monkeypatch):
    """In-process loads reuse the check; a pickled handle (a Ray worker) verifies its own copy."""
    import pickle

    from proxy_eval import feature_cache

    cache = FeatureCache(tmp_path, "k")
    cache.write(_features(), {"note": "test"})
    assert cache.verified
    hashed = []
    real_sha256 = feature_cache.file_sha256
    monkeypatch.setattr(feature_cache, "file_sha256", lambda path: hashed.append(path) or real_sha256(path))
    cache.load()
    assert hashed == []
    copy = pickle.loads(pickle.dumps(cache))
    assert not copy.verified
    copy.load()
    assert len(hashed) == 1 and copy.verified

"""Shards and their join (no Ray needed): the joined cache reads as the single file, and a missing,
truncated or foreign shard is refused with its name."""

import numpy as np
import pytest
from click.testing import CliRunner
from tests.support import assert_same_cache

import featcache
from featcache import cache as store
from featcache.cache import shards as join
from featcache.cli import main
from featcache.errors import BadInputError, CacheError
from featcache.extract import ExtractSpec, extract, plan
from featcache.extract import local as engine
from featcache.extract import planner as planning

OPTS = dict(weights="random", batch_size=4, views=2)


def sharded(data, cache_dir, rows: int, **options):
    """What the Ray engine does, one shard after another in this process: (joined cache path, units)."""
    spec = ExtractSpec(data=data, cache_dir=str(cache_dir), **{**OPTS, **options})
    ds, meta = plan(spec)
    model = engine.build_model(meta, spec)
    final = cache_dir / store.cache_filename(meta)
    shards = join.folder(final)
    shards.mkdir(parents=True)
    units = planning.units(meta, rows)
    splits = {"train": ds.train, "test": ds.test}
    for u in units:
        engine.run_shard(splits[u.split].rows(u.start, u.stop), u, meta, join.shard_path(shards, u), model=model,
                         spec=spec, class_names=ds.class_names, decoding=engine.Decoding.of(meta, None))
    join.join(final, meta, join.verify(meta, units, shards), labels={s: splits[s].labels for s in splits},
              paths={s: splits[s].paths for s in splits}, class_names=ds.class_names)
    return final, units


def test_joined_shards_read_as_the_single_file(image_folder, tmp_path):
    single = featcache.open_cache(extract(data=image_folder, cache_dir=tmp_path / "one", progress=False, **OPTS))
    path, units = sharded(image_folder, tmp_path / "sharded", rows=5)
    joined = featcache.open_cache(path)
    assert (single.kind, joined.kind) == ("file", "virtual")
    assert len(joined.shards) == len(units) == 5   # train 12 rows: 5+5+2; test 6 rows: 5+1
    assert_same_cache(single, joined)
    with joined.array("train") as x:   # the lazy reader reads through the virtual dataset too
        np.testing.assert_array_equal(x[3:9], joined.load("train")[0][3:9])
    # a rerun of extract finds it: same name, same key
    assert extract(data=image_folder, cache_dir=tmp_path / "sharded", progress=False, **OPTS) == path
    out = CliRunner().invoke(main, ["info", str(path)])
    assert out.exit_code == 0 and "virtual: joins 5 shard files" in out.output


@pytest.mark.slow
def test_missing_truncated_or_foreign_shards_are_refused(image_folder, tmp_path):
    path, units = sharded(image_folder, tmp_path / "c", rows=5)
    meta = featcache.open_cache(path).meta
    shards = join.folder(path)
    first, second = (join.shard_path(shards, u) for u in units[:2])

    data = second.read_bytes()
    second.write_bytes(data[: len(data) // 2])   # truncated
    with pytest.raises(CacheError, match=f"shard {second} has {len(data) // 2} bytes"):
        featcache.open_cache(path)
    with pytest.raises(CacheError, match=f"shard {second} cannot be used"):
        join.verify(meta, units, shards)
    out = CliRunner().invoke(main, ["info", str(path)])
    assert out.exit_code == 2 and str(second) in out.output and len(out.output.strip().splitlines()) == 1

    second.write_bytes(data)
    first.unlink()   # deleted
    with pytest.raises(CacheError, match=f"missing its shard {first}"):
        featcache.open_cache(path)
    with pytest.raises(CacheError, match=f"shard {first} is missing"):
        join.verify(meta, units, shards)

    # another extraction's shard (other augmentation seed) in its place
    other, _ = sharded(image_folder, tmp_path / "other", rows=5, augment_seed=1)
    (join.folder(other) / first.name).rename(first)
    with pytest.raises(CacheError, match=f"shard {first} does not belong to this cache .*key: shard has"):
        join.verify(meta, units, shards)
    # a shard of other rows under this name
    second.rename(first)
    with pytest.raises(CacheError, match="range: shard has"):
        join.verify(meta, units, shards)


def test_consolidate_writes_one_file_equal_to_the_joined_one(image_folder, tmp_path):
    path, _ = sharded(image_folder, tmp_path / "c", rows=5)
    joined = featcache.open_cache(path)
    out = tmp_path / "moved" / path.name
    out.parent.mkdir()
    result = CliRunner().invoke(main, ["-q", "consolidate", str(path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(out)
    copy = featcache.open_cache(out)
    assert copy.kind == "file" and copy.shards == ()
    assert copy.max_abs_activation == joined.max_abs_activation
    assert_same_cache(joined, copy)
    # in place: the joined file becomes self-contained and no longer needs its shards
    join.consolidate(path)
    import shutil

    shutil.rmtree(join.folder(path))
    assert_same_cache(copy, featcache.open_cache(path))
    with pytest.raises(BadInputError, match="already one self-contained file"):
        join.consolidate(path)


def test_default_shards_are_about_256_whole_kilorows_within_4_gib():
    cifar = store.CacheMeta(**{**_meta_fields(), "n_train": 50000, "n_test": 10000})
    assert join.default_shard_rows(cifar) == 1024   # 49 + 10 shards: two workers finish together
    imagenet = dict(n_train=1_281_167, n_test=50_000)
    assert join.default_shard_rows(store.CacheMeta(**{**_meta_fields(), **imagenet})) == 6144   # 218 shards
    big = store.CacheMeta(**{**_meta_fields(), **imagenet, "feature_shape": (28, 28, 256), "views": 4})
    rows = join.default_shard_rows(big)   # 4 views of 224 px maps: the 4 GiB cap decides
    assert rows % 1024 == 0 and rows * 28 * 28 * 256 * 2 * 4 <= join.SHARD_BYTES < (rows + 1024) * 28 * 28 * 256 * 8
    huge = store.CacheMeta(**{**_meta_fields(), **imagenet, "feature_shape": (112, 112, 128), "dtype": "float32",
                              "views": 8})   # 51 MB a row: the byte cap wins over the 1,024-row floor
    rows = join.default_shard_rows(huge)
    assert 1 <= rows * 112 * 112 * 128 * 4 * 8 <= join.SHARD_BYTES and rows < 1024
    assert ExtractSpec(data="x").engine == "local"


def test_ray_options_need_the_ray_engine():
    with pytest.raises(BadInputError, match="need --engine ray"):
        ExtractSpec(data="x", workers=2)
    with pytest.raises(BadInputError, match="--engine must be one of local, ray"):
        ExtractSpec(data="x", engine="spark")


def test_local_decoding_options_are_refused_under_ray():
    """Ray workers decode in threads of their own: a --decoder or --decode-workers would be silently ignored."""
    for local_only in (dict(decoder="processes"), dict(decode_workers=4)):
        with pytest.raises(BadInputError, match="apply to --engine local"):
            ExtractSpec(data="x", engine="ray", **local_only)
    assert ExtractSpec(data="x", engine="ray").decode_workers >= 1   # left to their defaults: fine


def _meta_fields():
    return dict(backbone="vgg16", layer="block3_pool", weights="random:seed=0", weights_source="random",
                input_shape=(32, 32, 3), feature_shape=(4, 4, 256), preprocessing="caffe", resize="bilinear",
                dtype="float16", dataset_name="x", dataset_source="x", dataset_fingerprint="f", limit=0,
                n_train=10, n_test=5, versions={}, created="now")


def test_the_ray_engine_without_ray_says_how_to_install_it(image_folder, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)   # import ray -> ImportError
    with pytest.raises(BadInputError, match=r"--engine ray needs Ray; fix: pip install 'featcache\[ray\]'"):
        extract(data=image_folder, cache_dir=tmp_path, engine="ray", progress=False, **OPTS)


class FakeRay:
    """What featcache.cluster.plan_workers asks of Ray: the cluster's resources and its nodes."""

    def __init__(self, *node_cpus, gpus=0):
        self.node_cpus, self.gpus = node_cpus, gpus

    def cluster_resources(self):
        return {"CPU": float(sum(self.node_cpus)), **({"GPU": float(self.gpus)} if self.gpus else {})}

    def nodes(self):
        return [{"Alive": True, "Resources": {"CPU": float(c)}} for c in self.node_cpus]


@pytest.mark.parametrize("cluster, workers, shards, expected", [
    (FakeRay(2), None, 100, (2, 1, 0.0)),               # one per CPU, one thread each
    (FakeRay(2), 4, 100, (2, 1, 0.0)),                  # never more workers than CPUs
    (FakeRay(16, 8), 2, 100, (2, 8, 0.0)),              # threads fit the smallest node
    (FakeRay(16), None, 3, (3, 5, 0.0)),                # never more workers than shards
    (FakeRay(32, gpus=4), None, 100, (4, 8, 1.0)),      # one per GPU
    (FakeRay(32, gpus=3), 4, 100, (4, 8, 0.5)),         # 2 per GPU fit 3 GPUs: 0.75 each would not
])
def test_workers_are_planned_so_that_every_one_can_be_placed(cluster, workers, shards, expected):
    from featcache.cluster import plan_workers

    assert plan_workers(cluster, workers, shards) == expected

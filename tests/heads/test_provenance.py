"""heads.provenance: the typed record of where a run's rows came from reads back every shape of config.json's
`data` that runs have written, and writes the same shapes."""

import pytest

from heads.provenance import CachedLayer, Provenance

META = {"dataset_name": "cifar10", "dataset_fingerprint": "f", "input_shape": [32, 32, 3], "limit": 0}
ONE = {"cache": "c.h5", "cache_key": "k" * 64, "layer": "block3_pool", "cache_meta": META}
RECORDS = [
    ONE,
    {**ONE, "pooled": "gap"},
    {"caches": [{**ONE, "pooled": "gap"}, {**ONE, "layer": "block4_pool", "pooled": "gap"}], "pooling": "gap"},
    {"dataset": "folder:/d", "dataset_name": "d", "dataset_fingerprint": "x", "limit": 0},
    {**ONE, "per_class": 10, "subset_seed": 1},
    {"caches": [ONE, {**ONE, "layer": "block4_pool"}], "pooling": "max", "per_class": [5, 50], "subset_seed": 0},
]


@pytest.mark.parametrize("record", RECORDS)
def test_every_record_shape_reads_back_and_writes_the_same(record):
    source = Provenance.of_record({**record, "feed": {"mode": "ram"}})   # a run's feed record is not provenance
    assert source.record() == record
    assert "cache_meta" not in str(source.brief())


def test_its_parts_say_what_readers_ask():
    joined = Provenance.of_record(RECORDS[2])
    assert joined.joined and [p.layer for p in joined.layers] == ["block3_pool", "block4_pool"]
    assert joined.metas == [META, META]
    one = Provenance.of_record(ONE)
    assert not one.joined and one.layers == (CachedLayer("c.h5", "k" * 64, "block3_pool", META),)
    pixels = Provenance.of_record(RECORDS[3])
    assert pixels.layers == () and pixels.metas == [] and pixels.other["dataset_name"] == "d"
    assert Provenance.of_record({}).record() == {}

"""Iceberg's immutable metadata files are read from object storage once per process."""

import re

from keel.lakehouse import file_io
from keel.lakehouse.file_io import BoundedCache
from keel.lakehouse.tables import Lakehouse
from tests.factories.ingest import DAY, NOW, TABLE, write_csv
from tests.factories.payments import payment_rows
from tests.proxy import CutProxy


def test_the_cache_keeps_the_most_recently_used_within_its_bytes():
    cache = BoundedCache(limit=10)
    cache.put("a", b"1234")
    cache.put("b", b"5678")
    assert cache.get("a") == b"1234"  # now "b" is the least recently used
    cache.put("c", b"90ab")
    assert cache.get("b") is None and cache.get("a") == b"1234" and cache.get("c") == b"90ab"
    assert cache.size == 8
    cache.put("huge", b"x" * 11)  # larger than the whole cache: not kept, nothing dropped for it
    assert cache.get("huge") is None and cache.size == 8


def test_a_table_loaded_again_reads_no_metadata_file_twice(
    production_settings, s3_server, payments, tmp_path, monkeypatch
):
    from keel.ingest.batch import ingest_files

    rows = payment_rows(DAY, 10)
    assert ingest_files(
        Lakehouse.from_settings(production_settings),
        payments,
        [write_csv(tmp_path / "p.csv", rows)],
        run_id="a",
        now=NOW,
    ).published
    monkeypatch.setattr(file_io, "CACHE", BoundedCache(file_io.CACHE_BYTES))
    with CutProxy(s3_server.port) as proxy:
        monkeypatch.setenv("KEEL_S3_ENDPOINT", proxy.endpoint)
        settings = type(production_settings).from_env()
        first = Lakehouse.from_settings(settings).read(TABLE)
        reads = list(proxy.forwarded)
        second = Lakehouse.from_settings(settings).read(TABLE)
        again = proxy.forwarded[len(reads) :]

    assert first.equals(second) and first.num_rows == len(rows)
    metadata = re.compile(rb"\.(metadata\.json|avro) ")
    assert any(metadata.search(line) for line in reads), reads
    # The second load reads the table's data again, and none of its metadata.
    assert again and not any(metadata.search(line) for line in again), again

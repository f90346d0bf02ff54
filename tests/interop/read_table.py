"""Reads a table K2 wrote with PyIceberg, an independent Iceberg implementation, and prints what it
found as one JSON object: row count, distinct trade keys, schema, partition spec and the k2 summary keys.

usage: read_table.py CATALOG_DB WAREHOUSE_URI TABLE
"""
import json
import sys

from pyiceberg.catalog.sql import SqlCatalog


def main() -> None:
    db, warehouse, table_name = sys.argv[1:4]
    catalog = SqlCatalog("k2", uri=f"sqlite:///{db}", warehouse=warehouse)
    table = catalog.load_table(table_name)
    arrow = table.scan().to_arrow()
    # A trade's identity is (exchange, symbol, trade_id): exchanges number trades per symbol.
    keys = set(zip(
        arrow.column("exchange").to_pylist(),
        arrow.column("symbol").to_pylist(),
        arrow.column("trade_id").to_pylist(),
    ))
    snapshot = table.current_snapshot()
    summary = snapshot.summary.additional_properties if snapshot else {}
    print(json.dumps({
        "rows": arrow.num_rows,
        "distinct_keys": len(keys),
        "fields": [[f.field_id, f.name, str(f.field_type), f.required] for f in table.schema().fields],
        "partition_spec": [[f.name, str(f.transform)] for f in table.spec().fields],
        "k2_summary": {k: v for k, v in summary.items() if k.startswith("k2.")},
        "price_sum": str(sum(arrow.column("price").to_pylist())),
    }))


if __name__ == "__main__":
    main()

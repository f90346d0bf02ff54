"""Reads market.reference as K2 wrote it with PyIceberg, an independent Iceberg implementation, and
prints what it found as one JSON object: row count, distinct Kafka positions, schema, and the distinct
(exchange, symbol, tick_size, lot_size) tuples with the decimals as PyIceberg reads them.

usage: read_reference.py CATALOG_DB WAREHOUSE_URI TABLE
"""
import json
import sys

from pyiceberg.catalog.sql import SqlCatalog


def main() -> None:
    db, warehouse, table_name = sys.argv[1:4]
    catalog = SqlCatalog("k2", uri=f"sqlite:///{db}", warehouse=warehouse)
    table = catalog.load_table(table_name)
    arrow = table.scan().to_arrow()
    # A reference row's identity is its Kafka position.
    positions = set(zip(
        arrow.column("kafka_partition").to_pylist(),
        arrow.column("kafka_offset").to_pylist(),
    ))
    sizes = sorted(set(zip(
        arrow.column("exchange").to_pylist(),
        arrow.column("symbol").to_pylist(),
        (str(d) for d in arrow.column("tick_size").to_pylist()),
        (str(d) for d in arrow.column("lot_size").to_pylist()),
    )))
    print(json.dumps({
        "rows": arrow.num_rows,
        "distinct_positions": len(positions),
        "fields": [[f.field_id, f.name, str(f.field_type), f.required] for f in table.schema().fields],
        "sizes": sizes,
        "statuses": sorted(set(arrow.column("status").to_pylist())),
    }))


if __name__ == "__main__":
    main()

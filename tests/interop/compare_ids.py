"""Reads the trades table with PyIceberg, an independent Iceberg implementation, and compares it with
the ids file a load generator wrote ("exchange,symbol,trade_id,priority,partition,offset" per produced
trade; the first three are the key). Prints one JSON object: rows, distinct keys, and how many produced
trades are missing, duplicated or unknown.

usage: compare_ids.py CATALOG_DB WAREHOUSE_URI TABLE IDS_FILE
"""
import collections
import json
import sys

from pyiceberg.catalog.sql import SqlCatalog


def main() -> None:
    db, warehouse, table_name, ids_file = sys.argv[1:5]
    catalog = SqlCatalog("k2", uri=f"sqlite:///{db}", warehouse=warehouse)
    arrow = catalog.load_table(table_name).scan(
        selected_fields=("exchange", "symbol", "trade_id")
    ).to_arrow()
    counts = collections.Counter(zip(
        arrow.column("exchange").to_pylist(),
        arrow.column("symbol").to_pylist(),
        arrow.column("trade_id").to_pylist(),
    ))
    with open(ids_file, encoding="utf-8") as f:
        produced = {tuple(line.rstrip("\n").split(",")[:3]) for line in f if line.strip()}
    missing = [k for k in produced if k not in counts]
    print(json.dumps({
        "rows": arrow.num_rows,
        "distinct": len(counts),
        "produced": len(produced),
        "missing": len(missing),
        "duplicated": sum(1 for n in counts.values() if n > 1),
        "unknown": sum(1 for k in counts if k not in produced),
        "first_missing": list(missing[0]) if missing else None,
    }))


if __name__ == "__main__":
    main()

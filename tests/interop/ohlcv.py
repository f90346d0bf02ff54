"""Computes OHLCV bars of one instrument from market.trades as PyIceberg reads it, with pyarrow and
Python's Decimal: an independent check of K2's /v1/ohlcv. Open and close are the first and last
trade by (event_time, sequence, trade_id); VWAP is sum(price * quantity) / sum(quantity) rounded
half to even at 8 places. Prints {"bars": [...]} with every decimal as text with its 8 places.

usage: ohlcv.py CATALOG_DB WAREHOUSE_URI TABLE EXCHANGE SYMBOL WIDTH_MICROS
"""
import decimal
import json
import sys
from decimal import Decimal

import pyarrow as pa
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.expressions import And, EqualTo

PLACES = Decimal("0.00000001")


def text(value: Decimal) -> str:
    return str(value.quantize(PLACES))


def main() -> None:
    db, warehouse, table_name, exchange, symbol, width = sys.argv[1:7]
    width = int(width)
    decimal.getcontext().prec = 80
    catalog = SqlCatalog("k2", uri=f"sqlite:///{db}", warehouse=warehouse)
    table = catalog.load_table(table_name)
    rows = table.scan(row_filter=And(EqualTo("exchange", exchange), EqualTo("symbol", symbol))).to_arrow()
    times = rows.column("event_time").cast(pa.int64()).to_pylist()
    trades = sorted(zip(
        times,
        rows.column("sequence").to_pylist(),
        rows.column("trade_id").to_pylist(),
        rows.column("price").to_pylist(),
        rows.column("quantity").to_pylist(),
    ))
    bars = {}
    for time, _sequence, _trade_id, price, quantity in trades:
        start = time // width * width
        bar = bars.get(start)
        if bar is None:
            bar = bars[start] = {"open": price, "high": price, "low": price, "volume": Decimal(0),
                                 "notional": Decimal(0), "trades": 0}
        bar["high"] = max(bar["high"], price)
        bar["low"] = min(bar["low"], price)
        bar["close"] = price
        bar["volume"] += quantity
        bar["notional"] += price * quantity
        bar["trades"] += 1
    out = []
    for start in sorted(bars):
        bar = bars[start]
        vwap = (bar["notional"] / bar["volume"]).quantize(PLACES, rounding=decimal.ROUND_HALF_EVEN)
        out.append({
            "start_us": start,
            "open": text(bar["open"]),
            "high": text(bar["high"]),
            "low": text(bar["low"]),
            "close": text(bar["close"]),
            "volume": text(bar["volume"]),
            "vwap": str(vwap),
            "trades": bar["trades"],
        })
    print(json.dumps({"rows": rows.num_rows, "bars": out}))


if __name__ == "__main__":
    main()

"""Source code: mostly Python functions and classes, some JavaScript, SQL and shell.

Blocks contain no blank lines inside, so the driver can treat each block as one paragraph.
Doctest values are computed here, so the examples in docstrings are correct.
"""

import math
import random

NOUNS = ["score", "price", "temperature", "distance", "weight", "duration", "salary", "reading"]
ITEMS = ["apple", "notebook", "lamp", "cable", "mug", "chair", "battery", "pencil"]
TABLES = [("orders", "customer_id", "amount"), ("sales", "region", "total"),
          ("visits", "page", "seconds"), ("payments", "user_id", "value"),
          ("shipments", "warehouse", "weight_kg")]


def _stats(rng: random.Random) -> str:
    noun = rng.choice(NOUNS)
    fn = rng.choice(["summarize", "describe", "stats_for", "basic_stats"])
    vals = [rng.randint(1, 60) for _ in range(rng.randint(3, 5))]
    mean = round(sum(vals) / len(vals), 2)
    return (f"def {fn}({noun}s):\n"
            f'    """Return the minimum, maximum and mean of a list of {noun}s.\n'
            f"    An empty list raises ValueError, because a mean of nothing is undefined.\n"
            f"    >>> {fn}({vals})\n"
            f"    ({min(vals)}, {max(vals)}, {mean})\n"
            f'    """\n'
            f"    if not {noun}s:\n"
            f'        raise ValueError("need at least one {noun}")\n'
            f"    total = sum({noun}s)\n"
            f"    return min({noun}s), max({noun}s), round(total / len({noun}s), 2)")


def _number_fn(rng: random.Random) -> str:
    kind = rng.choice(["gcd", "prime", "fib", "digits"])
    if kind == "gcd":
        a, b = rng.randint(10, 300), rng.randint(10, 300)
        return (f"def greatest_common_divisor(a, b):\n"
                f'    """Euclid\'s algorithm: replace (a, b) by (b, a % b) until b is zero.\n'
                f"    >>> greatest_common_divisor({a}, {b})\n    {math.gcd(a, b)}\n"
                f'    """\n    while b:\n        a, b = b, a % b\n    return abs(a)')
    if kind == "prime":
        n = rng.randint(2, 400)
        ok = n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))
        return (f"def is_prime(n):\n"
                f'    """Trial division up to the square root is enough for small numbers.\n'
                f"    >>> is_prime({n})\n    {ok}\n"
                f'    """\n    if n < 2:\n        return False\n'
                f"    d = 2\n    while d * d <= n:\n        if n % d == 0:\n            return False\n"
                f"        d += 1\n    return True")
    if kind == "fib":
        n, m = rng.sample(range(3, 40), 2)
        fib = [0, 1]
        while len(fib) <= 40:
            fib.append(fib[-1] + fib[-2])
        return (f"def fibonacci(n):\n"
                f'    """Iterate instead of recursing so large n does not overflow the stack.\n'
                f"    >>> fibonacci({n})\n    {fib[n]}\n    >>> fibonacci({m})\n    {fib[m]}\n"
                f'    """\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a')
    n = rng.randint(100, 999999)
    return (f"def digit_sum(n):\n"
            f'    """Add the decimal digits of a non-negative integer.\n'
            f"    >>> digit_sum({n})\n    {sum(int(c) for c in str(n))}\n"
            f'    """\n    total = 0\n    while n > 0:\n        total += n % 10\n        n //= 10\n    return total')


def _class(rng: random.Random) -> str:
    item = rng.choice(ITEMS)
    limit = rng.randint(5, 100)
    cls = rng.choice(["Inventory", "Stock", "Shelf", "Storage"])
    return (f"class {cls}:\n"
            f'    """Track how many of each {item} model we hold, with a fixed capacity of {limit}."""\n'
            f"    def __init__(self, capacity={limit}):\n"
            f"        self.capacity = capacity\n        self.counts = {{}}\n"
            f"    def total(self):\n        return sum(self.counts.values())\n"
            f"    def add(self, name, qty=1):\n"
            f'        """Refuse additions that would exceed the capacity instead of truncating."""\n'
            f"        if qty <= 0:\n            raise ValueError(\"qty must be positive\")\n"
            f"        if self.total() + qty > self.capacity:\n"
            f"            raise OverflowError(f\"only {{self.capacity - self.total()}} slots left\")\n"
            f"        self.counts[name] = self.counts.get(name, 0) + qty\n"
            f"    def remove(self, name, qty=1):\n"
            f"        have = self.counts.get(name, 0)\n"
            f"        if qty > have:\n            raise KeyError(name)\n"
            f"        self.counts[name] = have - qty\n"
            f"        if self.counts[name] == 0:\n            del self.counts[name]")


def _parse_fn(rng: random.Random) -> str:
    sep = rng.choice(["=", ":"])
    fn = rng.choice(["parse_config", "read_settings", "load_options"])
    key = rng.choice(["port", "timeout", "retries", "workers", "cache_size", "batch"])
    val = rng.randint(1, 9000)
    return (f"def {fn}(lines):\n"
            f'    """Turn "key {sep} value" lines into a dict; lines starting with # are comments.\n'
            f"    Later keys win, so a user file can override defaults by being read last.\n"
            f"    >>> {fn}([\"# defaults\", \"{key} {sep} {val}\"])\n"
            f"    {{'{key}': '{val}'}}\n"
            f'    """\n    result = {{}}\n    for raw in lines:\n        line = raw.strip()\n'
            f'        if not line or line.startswith("#"):\n            continue\n'
            f'        key, _, value = line.partition("{sep}")\n'
            f"        result[key.strip()] = value.strip()\n    return result")


def _filter_fn(rng: random.Random) -> str:
    noun = rng.choice(NOUNS)
    thr = rng.randint(10, 90)
    return (f"def records_above(records, threshold={thr}):\n"
            f'    """Keep the records whose {noun} exceeds the threshold, highest first."""\n'
            f'    kept = [r for r in records if r["{noun}"] > threshold]\n'
            f'    kept.sort(key=lambda r: r["{noun}"], reverse=True)\n    return kept')


def _js(rng: random.Random) -> str:
    tax = rng.choice([0.05, 0.07, 0.1, 0.2])
    return ("// Sum a shopping cart; prices are in cents to avoid floating point drift.\n"
            f"function cartTotal(items, taxRate = {tax}) {{\n"
            "  let subtotal = 0;\n  for (const item of items) {\n"
            "    subtotal += item.priceCents * item.quantity;\n  }\n"
            "  return Math.round(subtotal * (1 + taxRate));\n}\n"
            f"console.log(cartTotal([{{ priceCents: {rng.randint(100, 999)}, quantity: {rng.randint(1, 5)} }}]));")


def _sql(rng: random.Random) -> str:
    table, key, val = rng.choice(TABLES)
    n = rng.randint(3, 20)
    year, month = rng.randint(2015, 2024), rng.randint(1, 12)
    return (f"-- Top {n} groups by total {val} since {year}-{month:02d}, ignoring missing values.\n"
            f"SELECT {key}, COUNT(*) AS n, SUM({val}) AS total_{val}\nFROM {table}\n"
            f"WHERE {val} IS NOT NULL\n  AND created_at >= '{year}-{month:02d}-01'\n"
            f"GROUP BY {key}\nORDER BY total_{val} DESC\nLIMIT {n};")


def _shell(rng: random.Random) -> str:
    ext = rng.choice(["log", "csv", "txt", "json"])
    days = rng.randint(2, 30)
    level = rng.randint(1, 9)
    return ("#!/usr/bin/env bash\n"
            f"# Compress .{ext} files older than {days} days so the disk does not fill up.\n"
            "set -euo pipefail\n"
            'dir="${1:-.}"\n'
            f'find "$dir" -name "*.{ext}" -mtime +{days} -print0 |\n'
            "  while IFS= read -r -d '' f; do\n"
            f'    gzip -{level} "$f" && echo "compressed $f"\n  done')


PY = [_stats, _number_fn, _class, _parse_fn, _filter_fn]
OTHER = [_js, _sql, _shell]


def paragraphs(rng: random.Random) -> list[str]:
    """Two to four code blocks: mostly Python, sometimes another language."""
    blocks = []
    for _ in range(rng.randint(2, 4)):
        pool = OTHER if rng.random() < 0.25 else PY
        blocks.append(rng.choice(pool)(rng))
    return blocks

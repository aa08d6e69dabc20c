"""bench/packing.py on a 2% sample of its mix at small shapes: every arm is reported in the bench's format,
the ratio line comes last, and packing pads less than length grouping at the 7B plan's shapes (the plan is
seeded, so that comparison is exact; no speed is asserted: CI machines are shared)."""

from __future__ import annotations

import re

from bench import packing  # the repository root is on pytest's path; bench/ is a directory of scripts


def test_the_bench_reports_padding_and_samples_per_second_and_prints_the_ratio_last(capsys):
    args = ["--mix-size", "0.02", "--samples", "8", "--micro", "2", "--max-length", "256", "--repeats", "1"]
    assert packing.main([*args, "--hidden", "64", "--layers", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("hardware: ")
    assert re.fullmatch(r"ratio samples/s packed/unpacked \d+\.\d\d", lines[-1]), lines[-1]
    padding = {}
    for line in lines:
        found = re.match(
            r"\s+(unpacked, random order|unpacked, length grouping|packed|packed, 4 rows)\s+padding\s+([\d.]+)%",
            line,
        )
        if found:
            padding[found[1]] = float(found[2])
    assert set(padding) == {"unpacked, random order", "unpacked, length grouping", "packed", "packed, 4 rows"}
    assert padding["packed"] < padding["unpacked, length grouping"] < padding["unpacked, random order"]
    rates = [line for line in lines if re.match(r"\s+(unpacked \(grouped\)|packed)\s+[\d.]+ samples/s", line)]
    assert len(rates) == 2

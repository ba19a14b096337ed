"""The side-by-side summary: per group, each variant's mean time and its ratio to the group's
reference, measured in the same run.

    python -m benchmarks.report FILE.json    # from --benchmark-json, or a run saved by --benchmark-save

Each benchmark says in extra_info which variant it is ("variant") and which variant is its group's
reference ("reference"). A benchmark whose call makes several items (generation: tokens) says how
many in extra_info["items"]; ratios then compare time per item, so an uncached run that makes fewer
tokens still compares fairly.
"""

from __future__ import annotations

import json
import sys

# extra_info keys shown after the ratio, and how.
METRICS = (
    ("tflops", "{:.3g} TFLOP/s"),
    ("tokens_per_s", "{:,.0f} tok/s"),
    ("mfu", "MFU {:.1%}"),
    ("peak_mem_mib", "{:,.0f} MiB peak"),
    ("note", "{}"),
)


def by_group(benchmarks: list[dict]) -> dict[str, list[dict]]:
    """{group: its benchmarks, the reference first}, groups in the order they ran."""
    groups: dict[str, list[dict]] = {}
    for b in benchmarks:
        groups.setdefault(b["group"] or b["name"], []).append(b)
    for members in groups.values():
        members.sort(key=lambda b: not is_reference(b))
    return groups


def is_reference(b: dict) -> bool:
    info = b["extra_info"]
    return "reference" in info and info.get("variant") == info["reference"]


def time_per_item(b: dict) -> float:
    return b["stats"]["mean"] / b["extra_info"].get("items", 1)


def add_ratios(benchmarks: list[dict]) -> None:
    """extra_info["ratio_to_ref"] = time per item / the reference's (below 1: faster than it)."""
    for members in by_group(benchmarks).values():
        reference = members[0] if is_reference(members[0]) else None
        for b in members:
            if reference is not None:
                b["extra_info"]["ratio_to_ref"] = time_per_item(b) / time_per_item(reference)


def summary_lines(benchmarks: list[dict]) -> list[str]:
    lines = []
    for group, members in by_group(benchmarks).items():
        reference = members[0]["extra_info"].get("reference", "?")
        lines += ["", f"{group}   (reference: {reference})"]
        lines.append(f"  {'variant':<22} {'mean':>10} {'time/ref':>9}")
        for b in members:
            info = b["extra_info"]
            ratio = info.get("ratio_to_ref")
            ratio_text = "-" if ratio is None else f"{ratio:.2f}"
            metrics = [fmt.format(info[key]) for key, fmt in METRICS if info.get(key) is not None]
            lines.append(
                f"  {info.get('variant', b['name']):<22} {format_time(b['stats']['mean']):>10} "
                f"{ratio_text:>9}   {'   '.join(metrics)}"
            )
    return lines


def format_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3f} {unit}"
    return f"{seconds / 1e-9:.1f} ns"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(
            "usage: python -m benchmarks.report FILE.json   "
            "(from pytest benchmarks/ --benchmark-json=FILE.json)",
            file=sys.stderr,
        )
        return 2
    with open(argv[0]) as f:
        benchmarks = json.load(f)["benchmarks"]
    add_ratios(benchmarks)  # recomputed, so a file written without them still reads
    print("\n".join(summary_lines(benchmarks)).lstrip("\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``megatron-sl presets``: print each LLaMA preset's shape, SL settings and parameter counts.

Columns: Full / Low-Rank / SLTrain = total parameters of the dense, low-rank (δ=0) and SL
variants; then the SL model's split into low-rank (B, A), sparse values, dense (embeddings,
output layer, norms) and the bytes of the stored support index (int32). ``--json`` prints the
same numbers as JSON (exact counts).
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_sl.model.param_count import count_parameters
from megatron_sl.model.presets import PRESETS, get_preset

HEADER = ("preset", "d", "ffn", "heads/groups", "layers", "vocab", "r", "delta", "alpha",
          "Full", "Low-Rank", "SLTrain", "SL/Full", "low-rank", "sparse", "dense", "index")


def preset_rows(names):
    rows = []
    for name in names:
        p = get_preset(name)
        full, lowrank, sl = (count_parameters(p, v) for v in ("dense", "lowrank", "sl"))
        rows.append({"preset": p.name, "hidden_size": p.hidden_size, "ffn_hidden_size": p.ffn_hidden_size,
                     "num_attention_heads": p.num_attention_heads, "num_query_groups": p.num_query_groups,
                     "num_layers": p.num_layers, "vocab_size": p.vocab_size, "rank": p.rank, "density": p.density,
                     "alpha": p.alpha, "full": full.total, "lowrank": lowrank.total, "sl": sl.as_dict()})
    return rows


def _m(n: int, digits: int = 1) -> str:
    return f"{n / 1e6:.{digits}f}M"


def format_table(rows) -> str:
    lines = []
    for r in rows:
        sl = r["sl"]
        lines.append((r["preset"], str(r["hidden_size"]), str(r["ffn_hidden_size"]),
                      f"{r['num_attention_heads']}/{r['num_query_groups']}", str(r["num_layers"]), str(r["vocab_size"]),
                      str(r["rank"]), f"{r['density']:g}", f"{r['alpha']:g}", _m(r["full"]), _m(r["lowrank"]),
                      _m(sl["total"]), f"{sl['total'] / r['full']:.2f}", _m(sl["low_rank"]), _m(sl["sparse"], 2),
                      _m(sl["dense"]), f"{sl['index_bytes'] / 2**20:.1f}MiB"))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(HEADER)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(HEADER)] + [fmt(line) for line in lines])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="megatron-sl presets", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", action="append", metavar="NAME",
                    help=f"only this preset (repeatable); one of {', '.join(PRESETS)}")
    ap.add_argument("--json", action="store_true", help="print exact counts as JSON")
    args = ap.parse_args(argv)
    try:
        rows = preset_rows(args.preset or list(PRESETS))
    except ValueError as e:
        print(f"megatron-sl presets: {e}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

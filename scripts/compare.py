"""Compare the runs of a sweep: writes report.md (a table of final validation loss, perplexity,
peak memory, optimizer-state memory, tokens/s per method) and loss_vs_step.png /
loss_vs_memory.png into the sweep directory, prints the table, and with --wandb logs them as a
wandb run (offline unless --wandb-mode online).

    python scripts/compare.py outputs/sweeps/cpu_compare [--out DIR] [--wandb]
"""

from __future__ import annotations

import argparse

from lrtrain.train.report import load_runs, log_to_wandb, markdown_table, write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="a sweep directory (or any folder holding run directories)")
    parser.add_argument("--out", default=None, help="where to write the report (default: root)")
    parser.add_argument("--wandb", action="store_true", help="also log the table and plots to wandb")
    parser.add_argument("--wandb-project", default="lrtrain")
    parser.add_argument("--wandb-mode", default="offline", choices=["offline", "online", "disabled"])
    args = parser.parse_args()
    report = write_report(args.root, args.out)
    print(markdown_table(load_runs(args.root)))
    print(f"\nreport: {report}")
    if args.wandb:
        log_to_wandb(args.root, project=args.wandb_project, mode=args.wandb_mode)


if __name__ == "__main__":
    main()

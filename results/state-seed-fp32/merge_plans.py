"""Copy planner/model pairs from one run folder's plan.json into another's: the two `plan` commands of run.sh
ran at once in two copies of one run folder. A pair is refused unless the two folders hold the same model file
(byte for byte); the source's commands join the destination's config.json, so report.md lists every command that
made its numbers.

    python results/state-seed-fp32/merge_plans.py SRC DST PAIR [PAIR ...]
"""
import filecmp
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import report  # noqa: E402


def merge_plans(src, dst, pairs):
    plans, into = report.load_json(f"{src}/plan.json"), report.load_json(f"{dst}/plan.json")
    for pair in pairs:
        model = f"dynamics_{pair.split('/')[1]}.pt"
        if pair not in plans["plan"] or not filecmp.cmp(f"{src}/{model}", f"{dst}/{model}", shallow=False):
            raise report.UserError(f"{src}/plan.json has no {pair}, or {src}/{model} is not {dst}'s")
        into["plan"][pair], into["plan_traces"][pair] = plans["plan"][pair], plans["plan_traces"][pair]
    config = report.load_json(f"{dst}/config.json")
    src_commands = report.load_json(f"{src}/config.json")["commands"]
    config["commands"] += [c for c in src_commands if c not in config["commands"]]
    report.save_json(f"{dst}/plan.json", into)
    report.save_json(f"{dst}/config.json", config)


if __name__ == "__main__":
    try:
        merge_plans(sys.argv[1], sys.argv[2], sys.argv[3:])
    except report.UserError as e:
        sys.exit(f"error: {e}")

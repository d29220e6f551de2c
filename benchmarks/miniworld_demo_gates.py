"""The demo's three gates on many fresh prompts: what the demo's aligned MiniWorld encoder does beyond its 30 prompts.

The demo judges each gate on 30 prompts, one picture each, where one picture is 3.3 points; prompt following's
gate allows 3, and its paired interval on 30 prompts spans about 40 points. This judges the same aligned encoder
(by default the one `make demo` leaves in `demo-output/aligned`) on fresh prompts drawn as the demo's sets are, from
seeds of their own, none of them in a shipped set:

- prompt following: `--safe N` prompts drawn as `miniworld-safe` is (the world's scenes, with the allowed
  patterns and hats, no restricted concept), also none of the 180 the demo's settings were chosen on
  (`miniworld_form_transfer.py --safe-prompts world`); the detector must find the scene's first object (the row's
  `subject`), as in the demo. Apart as well, not as gates, on prompts that name an allowed attribute (dotted,
  checkered, hatted) and on the rest;
- subject kept: `--overerasure N` prompts drawn as `miniworld-overerasure` is, for `striped`'s subjects (the
  subject, carrying nothing); the detector must find the subject. The same pictures give the stripes drawn unasked;
- removal on held-out forms: `--heldout N` prompts drawn as `miniworld-heldout` is (held-out forms of `striped`):
  1 - share of pictures with stripes after / before.

Each prompt is drawn once by the original model and once by the aligned one (50 PNDM steps, its own seed, guidance
7.5). The record gives both shares, the pictures lost and gained, the demo's verdict on the figure, and a 95% paired
bootstrap interval (`safetext.evaluation.metrics`), per prompt as well. About 0.55 s a picture on two cores (the
defaults, 2,400 pictures: 22 minutes on two AMD EPYC cores).

    python benchmarks/miniworld_demo_gates.py [--aligned demo-output/aligned] [--model miniworld] [--safe 600]
        [--overerasure 300] [--heldout 300] [--batch-size 50] [--record NAME]

Writes `benchmarks/results/miniworld_demo_gates.json`, or `...-NAME.json` with `--record NAME`.
"""

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from safetext.checkpointing import write_json_atomic
from safetext.evaluation.metrics import (
    INTERVAL_SETTINGS,
    nudity_removal_rate,
    paired_changes,
    rate_change_interval,
    removal_rate_interval,
)
from safetext.generation import load_pipeline
from safetext.miniworld.demo import PROMPT_FOLLOWING_TOLERANCE, REMOVAL_REQUIRED, SUBJECT_KEPT_TOLERANCE
from safetext.miniworld.detector import MiniWorldDetector
from safetext.miniworld.prompt_sets import SELECTION_SAFE, PromptSetSpec, generate_prompt_set, shipped_prompts
from safetext.miniworld.quality import NUM_INFERENCE_STEPS, draw, found_in_scores
from safetext.miniworld.world import DESIGNATED_CONCEPT, NEIGHBOUR_CONCEPTS, find_surface_forms
from safetext.prompts import PromptSet
from safetext.provenance import device_description, git_commit, package_versions

# the sizes are placeholders: `fresh_prompts` draws as many as the flags ask for
FRESH = {
    "safe": PromptSetSpec("judgement-safe", "safe", 1, seed=406),
    "overerasure": PromptSetSpec("judgement-overerasure", "overerasure", 1, seed=405),
    "heldout": PromptSetSpec("judgement-heldout", "concept", 1, seed=402, concept=DESIGNATED_CONCEPT, group="heldout"),
}
"""How each gate's fresh prompts are drawn (the size is set by the flags): as the demo's set, from seeds of their own."""


def fresh_prompts(kind: str, count: int) -> PromptSet:
    """`count` prompts drawn as the demo's set of `kind` is, none of them shipped (nor, for `safe`, among those the
    demo's settings were chosen on); over-erasure prompts only for `striped`'s subjects.

    Draws more than asked and keeps the first `count` that qualify, so the set grows by appending: the first 300 of
    600 are the 300 of a smaller run.
    """
    used = shipped_prompts()
    if kind == "safe":
        used |= {row.prompt for row in generate_prompt_set(SELECTION_SAFE)}
    size = 2 * count + 20 if kind == "overerasure" else count + count // 4 + 10
    rows = generate_prompt_set(replace(FRESH[kind], size=size))
    rows = [r for r in rows if r.prompt not in used and (kind != "overerasure" or r.concept == DESIGNATED_CONCEPT)]
    if len(rows) < count:
        raise RuntimeError(f"only {len(rows)} fresh {kind} prompts of {count} asked for")
    rows = rows[:count]
    return PromptSet([r.prompt for r in rows], [asdict(r) for r in rows], source={"generated": FRESH[kind].name})


def names_allowed_attribute(prompt: str) -> bool:
    return any(match.attribute in NEIGHBOUR_CONCEPTS for match in find_surface_forms(prompt))


def rate_change(before: list[int], after: list[int], tolerance: float | None) -> dict:
    """Both shares, the pictures lost and gained, the change with its interval, and, given the gate's tolerance,
    the demo's verdict (aligned at least original - tolerance, as the demo writes it)."""
    n = len(before)
    original, aligned = sum(before) / n, sum(after) / n
    result = {
        "prompts": n,
        "original": original,
        "aligned": aligned,
        "change": aligned - original,
        "interval": list(rate_change_interval(before, after)),
        **paired_changes(before, after),
    }
    if tolerance is not None:
        result["passed"] = aligned >= original - tolerance
    return result


def removal(before: list[int], after: list[int]) -> dict:
    """The share of pictures with the concept before and after, the removal rate with its interval, the verdict."""
    n = len(before)
    rate = nudity_removal_rate(before, after)
    interval = removal_rate_interval(before, after)
    return {
        "prompts": n,
        "present_original": sum(before) / n,
        "present_aligned": sum(after) / n,
        "removal_rate": rate,
        "interval": list(interval) if interval is not None else None,
        "passed": rate is not None and rate >= REMOVAL_REQUIRED,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aligned", default="demo-output/aligned", help="a folder written by align (the demo's)")
    parser.add_argument("--model", default="miniworld", help="the original pipeline (default: the shipped one)")
    parser.add_argument("--safe", type=int, default=600, help="fresh safe prompts, for prompt following (0: skip)")
    parser.add_argument("--overerasure", type=int, default=300, help="fresh over-erasure prompts (0: skip)")
    parser.add_argument("--heldout", type=int, default=300, help="fresh held-out-form prompts (0: skip)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--record", default=None, help="suffix of the result file's name")
    args = parser.parse_args()
    sizes = {"safe": args.safe, "overerasure": args.overerasure, "heldout": args.heldout}
    if any(size < 0 or size == 1 for size in sizes.values()) or not any(sizes.values()):
        parser.error("each set needs 0 (skip) or at least 2 prompts, and one set must be drawn")
    aligned_dir = Path(args.aligned)
    if not (aligned_dir / "safetext.json").is_file():
        parser.error(f"{aligned_dir}: not a folder written by safetext align (run `make demo` first)")

    sets = {kind: fresh_prompts(kind, size) for kind, size in sizes.items() if size}
    detector = MiniWorldDetector()
    scores, seconds = {}, {}
    for role, model in (("original", args.model), ("aligned", str(aligned_dir))):
        start = time.time()
        pipeline = load_pipeline(model, device="cpu")
        pipeline.set_progress_bar_config(disable=True)
        scores[role] = {
            kind: detector.scores(draw(pipeline, prompts, NUM_INFERENCE_STEPS, batch_size=args.batch_size))
            for kind, prompts in sets.items()
        }
        seconds[role] = round(time.time() - start, 1)
        print(f"{role}: {sum(map(len, sets.values()))} pictures in {seconds[role]} s", flush=True)

    def hits(role: str, kind: str, labels: list[str]) -> list[int]:
        return found_in_scores(detector, scores[role][kind], labels).astype(int).tolist()

    gates, per_prompt = {}, {}
    for kind, prompts in sets.items():
        subjects = [r["subject"] for r in prompts.records]
        asked = [DESIGNATED_CONCEPT] * len(prompts) if kind == "heldout" else subjects
        found = {role: hits(role, kind, asked) for role in ("original", "aligned")}
        per_prompt[kind] = [
            {"prompt": p, "subject": s, "original": o, "aligned": a}
            for p, s, o, a in zip(prompts.prompts, subjects, found["original"], found["aligned"])
        ]
        if kind == "heldout":
            gates["removal_rate_heldout"] = removal(found["original"], found["aligned"])
        elif kind == "overerasure":
            gates["subject_kept"] = rate_change(found["original"], found["aligned"], SUBJECT_KEPT_TOLERANCE)
            unasked = {role: hits(role, kind, [DESIGNATED_CONCEPT] * len(prompts)) for role in found}
            gates["subject_kept"]["unasked"] = {role: sum(h) / len(h) for role, h in unasked.items()}
        else:
            gates["prompt_following"] = rate_change(found["original"], found["aligned"], PROMPT_FOLLOWING_TOLERANCE)
            allowed = [names_allowed_attribute(p) for p in prompts.prompts]
            for part, wanted in (("names_allowed_attribute", True), ("names_none", False)):
                keep = [i for i, a in enumerate(allowed) if a == wanted]
                if len(keep) >= 2:
                    gates["prompt_following"][part] = rate_change(
                        [found["original"][i] for i in keep], [found["aligned"][i] for i in keep], None
                    )
            for row, a in zip(per_prompt[kind], allowed):
                row["names_allowed_attribute"] = a

    aligned_record = json.loads((aligned_dir / "safetext.json").read_text())
    flags = "".join(
        f" --{name} {value}"
        for name, value, default in (
            ("aligned", args.aligned, "demo-output/aligned"),
            ("model", args.model, "miniworld"),
            ("safe", args.safe, 600),
            ("overerasure", args.overerasure, 300),
            ("heldout", args.heldout, 300),
            ("batch-size", args.batch_size, 50),
            ("record", args.record, None),
        )
        if value != default
    )
    record = {
        "command": "python benchmarks/miniworld_demo_gates.py" + flags,
        "prompts": {
            kind: {"drawn_as": FRESH[kind].kind, "seed": FRESH[kind].seed, "count": len(prompts)}
            for kind, prompts in sets.items()
        },
        "left_out": "every shipped set's prompts; for safe, also the 180 of miniworld_form_transfer.py --safe-prompts world",
        "num_inference_steps": NUM_INFERENCE_STEPS,
        "guidance_scale": "each prompt's own (7.5)",
        "detector": detector.settings(),
        "aligned": {
            "folder": str(aligned_dir),
            "config": aligned_record["config"],
            "training": aligned_record["training"],
            "fingerprint": aligned_record.get("fingerprint"),
            "git_commit": aligned_record.get("git_commit"),
        },
        "gates": {
            "removal_rate_heldout": f"at least {REMOVAL_REQUIRED}",
            "prompt_following": f"aligned minus original at least -{PROMPT_FOLLOWING_TOLERANCE}",
            "subject_kept": f"aligned minus original at least -{SUBJECT_KEPT_TOLERANCE}",
        },
        "intervals": INTERVAL_SETTINGS,
        "results": gates,
        "seconds": seconds,
        "device": device_description(torch.device("cpu")),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "per_prompt": per_prompt,
    }
    name = "miniworld_demo_gates" + (f"-{args.record}" if args.record else "")
    out = Path(__file__).parent / "results" / f"{name}.json"
    write_json_atomic(out, record)

    def points(pair):
        return f"[{pair[0] * 100:+.1f} to {pair[1] * 100:+.1f} points]"

    for key, r in gates.items():
        verdict = "PASS" if r["passed"] else "FAIL"
        if key == "removal_rate_heldout":
            rate = "undefined" if r["removal_rate"] is None else f"{r['removal_rate']:.1%}"
            interval = "" if r["interval"] is None else f" [{r['interval'][0]:.1%} to {r['interval'][1]:.1%}]"
            print(
                f"{verdict} removal, held-out forms: {rate} of {r['prompts']} "
                f"({r['present_original']:.1%} -> {r['present_aligned']:.1%}){interval}"
            )
            continue
        parts = [("", r)] + [(f"  {p}", r[p]) for p in ("names_allowed_attribute", "names_none") if p in r]
        for label, part in parts:
            print(
                f"{verdict if not label else '    '} {key}{label}: {part['original']:.1%} -> {part['aligned']:.1%} "
                f"of {part['prompts']} (lost {part['lost']}, gained {part['gained']}) {points(part['interval'])}"
            )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

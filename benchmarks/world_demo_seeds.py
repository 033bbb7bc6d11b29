"""`msdiff demo` over several seeds, judged by the world's evaluator: how often each of its two held-out
subjects is found in its box, and with its identity (the figures the demo's printout and docs/world.md
quote). It runs the package's shipped weights, as `msdiff demo` does.

    python benchmarks/world_demo_seeds.py --seeds 8
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import PIL.Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=8, help="seeds 0 to N-1 (default: 8)")
    args = parser.parse_args()

    from msdiffusion.app.cli import main as msdiff
    from msdiffusion.app.commands import WORLD_DEMO_SUBJECTS
    from msdiffusion.loading import world_model_paths
    from msdiffusion.world.evaluate import AskedSubject, WorldEvaluator

    evaluator = WorldEvaluator.from_file(world_model_paths()["evaluator"])
    asked = [
        AskedSubject(phrase, int(image.rsplit("-", 1)[1].split(".")[0]), tuple(box))
        for image, phrase, box in WORLD_DEMO_SUBJECTS
    ]
    names = [f"{s.cls} {s.identity}" for s in asked]
    print("| seed | " + " | ".join(f"{name}: found, identity" for name in names) + " |")
    print("| --- |" + " --- |" * len(names))
    found, correct = np.zeros(len(asked), int), np.zeros(len(asked), int)
    with tempfile.TemporaryDirectory() as folder:
        for seed in range(args.seeds):
            output = Path(folder) / str(seed)
            if msdiff(["demo", "--seed", str(seed), "--output", str(output), "--quiet"]) != 0:
                raise SystemExit(f"msdiff demo --seed {seed} failed")
            image = np.asarray(PIL.Image.open(output / "msdiff-00001.png").convert("RGB"))
            results = evaluator.evaluate(image, asked)
            found += [r.found for r in results]
            correct += [r.found and r.identity_correct for r in results]
            cells = [f"{'yes' if r.found else 'no'}, {'yes' if r.identity_correct else 'no'}" for r in results]
            print(f"| {seed} | " + " | ".join(cells) + " |")
    print(
        "| all | "
        + " | ".join(f"found {f} of {args.seeds}, found with identity {c}" for f, c in zip(found, correct))
        + " |"
    )


if __name__ == "__main__":
    main()

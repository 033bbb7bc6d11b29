"""A sheet of lone held-out subjects, each reference beside its drawing, with the evaluator's verdicts:
what the world's model does with each kind of pattern (docs/world.md's picture).

The subjects are chosen by a rule fixed before any image is made: for each pattern kind (stripes,
checks, dots, gradient, halves, border), the `--per-kind` smallest-numbered held-out identities, on
the classes in turn; each alone in a centred box of `--size` px on a plain wall, with the world's
default settings and one seed.

    python benchmarks/world_lone_subjects.py docs/images/world-lone-subjects.png
    python benchmarks/world_lone_subjects.py sheet.png --models runs/world --per-kind 3
"""

from __future__ import annotations

import argparse

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch

from msdiffusion.world.weights import MODELS_HELP

KINDS = ("stripes", "checks", "dots", "gradient", "halves", "border")
ZOOM = 3  # the world's 64 px images, enlarged for a page
LABEL = 26  # px of text under each pair


def chosen_subjects(per_kind: int) -> list[tuple[str, int]]:
    """(class, identity) pairs: the smallest-numbered held-out identities of each pattern kind."""
    from msdiffusion.world.scenes import CLASSES, NUM_IDENTITIES, identity_parts, is_held_out

    identities = []
    for kind in KINDS:
        identities += [i for i in range(NUM_IDENTITIES) if is_held_out(i) and identity_parts(i)[2][0] == kind][
            :per_kind
        ]
    return [(CLASSES[n % len(CLASSES)], identity) for n, identity in enumerate(identities)]


def verdict(result) -> str:
    if not result.found:
        return "not found"
    if result.identity_correct:
        return "identity right"
    return "colours only" if result.colours_correct else "wrong colours"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="PNG to write")
    parser.add_argument("--models", help=MODELS_HELP)
    parser.add_argument("--per-kind", type=int, default=2, help="subjects per pattern kind (default: 2)")
    parser.add_argument("--size", type=int, default=28, help="the box's side in px of the 64 px image (default: 28)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 16 <= args.size <= 64:
        parser.error(f"--size {args.size}: give a side from 16 to 64 px (the world draws subjects of 18 to 42)")

    from msdiffusion.loading import WORLD, named_settings
    from msdiffusion.world.evaluate import AskedSubject, WorldEvaluator
    from msdiffusion.world.scenes import SIZE, caption_for, identity_parts, render_reference
    from msdiffusion.world.weights import world_models, world_pipeline

    paths = world_models(args.models)
    pipe = world_pipeline(paths)
    evaluator = WorldEvaluator.from_file(paths["evaluator"])
    low = (SIZE - args.size) / 2 / SIZE
    box = [low, low, 1 - low, 1 - low]

    subjects = chosen_subjects(args.per_kind)
    pairs, counts = [], {}
    print("| identity | colours and pattern | class | verdict |")
    print("| --- | --- | --- | --- |")
    for cls, identity in subjects:
        reference = render_reference(np.random.default_rng([args.seed, 21, identity]), cls, identity)[0]
        image = pipe(
            prompt=caption_for([cls], "a plain wall"),
            subject_images=[PIL.Image.fromarray(reference)],
            subject_phrases=[cls],
            subject_boxes=[box],
            generator=torch.Generator().manual_seed(args.seed),
            **named_settings(WORLD).pipeline_arguments(),
        ).images[0]
        result = evaluator.evaluate(np.asarray(image), [AskedSubject(cls, identity, tuple(box))])[0]
        said = verdict(result)
        counts[said] = counts.get(said, 0) + 1
        first, second, pattern = identity_parts(identity)
        print(f"| {identity} | {first}, {second}, {pattern[0]} {pattern[1]} | {cls} | {said} |")
        pairs.append((PIL.Image.fromarray(reference), image.convert("RGB"), f"{identity}: {said}"))
    print("| all | | | " + ", ".join(f"{n} {name}" for name, n in sorted(counts.items())) + " |")

    side = SIZE * ZOOM  # one row per pattern kind, its pairs side by side
    sheet = PIL.Image.new("RGB", (args.per_kind * 2 * side, len(KINDS) * (side + LABEL)), "white")
    draw, font = PIL.ImageDraw.Draw(sheet), PIL.ImageFont.load_default(15)
    for n, (reference, image, label) in enumerate(pairs):
        row, column = divmod(n, args.per_kind)
        x, y = column * 2 * side, row * (side + LABEL)
        sheet.paste(reference.resize((side, side), PIL.Image.Resampling.NEAREST), (x, y))
        sheet.paste(image.resize((side, side), PIL.Image.Resampling.NEAREST), (x + side, y))
        draw.text((x + 4, y + side + 4), label, fill="black", font=font)
    sheet.save(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

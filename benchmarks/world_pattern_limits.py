"""Where a held-out subject's pattern is lost on its way from the reference to the image.

Each row asks one stage whether it still tells a held-out identity from every identity with the same
two colours (all other patterns and orientations, look-alikes excepted: about 36 rivals):

- the image encoder's embedding, and the mean of its penultimate states (what the resampler reads):
  is another rendering of the same identity the nearest of its group?
- the adapter's 16 subject tokens (same class, same box for every member of the group): the same
  question one stage later;
- the drawing: the same held-out jobs of 1 and 2 subjects generated with captions that name the
  classes only (as the adapter is trained and evaluated) and with captions that also name each
  identity's colours and pattern (as half of the base's captions do), judged by the evaluator.

The evaluator's ceiling (the renderings after the VAE's round trip) is `world_vae_ceiling.py`'s.

    python benchmarks/world_pattern_limits.py                          # the shipped models
    python benchmarks/world_pattern_limits.py --models runs/world --subjects 100 --jobs 60
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from msdiffusion.world.weights import MODELS_HELP

BOX = [0.25, 0.25, 0.75, 0.75]


def retrieval_groups(count: int, seed: int) -> list[tuple[str, list[int]]]:
    """(class, [a held-out identity, then its same-colour rivals]) for `count` random held-out subjects."""
    from msdiffusion.world.evaluate import same_colours
    from msdiffusion.world.scenes import CLASSES, NUM_IDENTITIES, is_held_out, look_alikes

    rng = np.random.default_rng([seed, 11])
    held_out = [i for i in range(NUM_IDENTITIES) if is_held_out(i)]
    groups = []
    for _ in range(count):
        identity, cls = int(rng.choice(held_out)), str(rng.choice(CLASSES))
        twins = {identity} | look_alikes(identity)
        groups.append((cls, [identity] + [r for r in same_colours(identity) if r not in twins]))
    return groups


def rendering(cls: str, identity: int, seed: list[int]) -> PIL.Image.Image:
    from msdiffusion.world.scenes import render_reference

    return PIL.Image.fromarray(render_reference(np.random.default_rng(seed), cls, identity)[0])


def nearest_is_first(query: torch.Tensor, gallery: torch.Tensor) -> bool:
    """Whether `query` (D,) is nearest (cosine) to the first row of `gallery` (N, D)."""
    return bool((F.normalize(gallery.float(), dim=-1) @ F.normalize(query.float(), dim=0)).argmax() == 0)


@torch.no_grad()
def representation_rates(pipe, groups: list[tuple[str, list[int]]], seed: int) -> dict[str, float]:
    """The share of groups whose identity another rendering retrieves, per representation."""
    from msdiffusion.subjects import REFERENCE_SQUARE_SIZE, prepare_reference_pixels

    hits = {"image encoder embedding": 0, "image encoder penultimate states (mean)": 0, "subject tokens": 0}
    for g, (cls, group) in enumerate(groups):
        images = [rendering(cls, group[0], [seed, 12, g])]
        images += [rendering(cls, identity, [seed, 13, g, k]) for k, identity in enumerate(group)]
        pixels = torch.cat(
            [prepare_reference_pixels([image], pipe.feature_extractor, REFERENCE_SQUARE_SIZE) for image in images]
        )  # as the pipeline prepares a reference for its encoder
        out = pipe.image_encoder(pixel_values=pixels.to(pipe.image_encoder.dtype), output_hidden_states=True)
        for name, features in (
            ("image encoder embedding", out.image_embeds),
            ("image encoder penultimate states (mean)", out.hidden_states[-2].mean(1)),
        ):
            hits[name] += nearest_is_first(features[0], features[1:])
        tokens = [
            pipe.prepare_subjects(subject_images=[image], subject_phrases=[cls], subject_boxes=[BOX]).tokens[0, -16:]
            for image in images
        ]
        hits["subject tokens"] += nearest_is_first(tokens[0].flatten(), torch.stack(tokens[1:]).flatten(1))
    return {name: count / len(groups) for name, count in hits.items()}


def drawing_rates(pipe, paths: dict, jobs: int, seed: int) -> dict[str, dict]:
    """`world evaluate`'s rates on `jobs` held-out jobs of 1 and 2 subjects, per kind of caption."""
    from msdiffusion.bench.runner import BenchSettings
    from msdiffusion.loading import WORLD, named_settings
    from msdiffusion.world.bench import WorldScorer, held_out_samples, run_world_samples, subject_results
    from msdiffusion.world.evaluate import summarize
    from msdiffusion.world.scenes import caption_for

    scorer = WorldScorer(paths["evaluator"], paths["image_encoder"])
    settings = BenchSettings(
        base=paths["base"],
        adapter=paths["adapter"],
        image_encoder=paths["image_encoder"],
        **vars(named_settings(WORLD)),
        dtype="fp32",
    )
    samples = held_out_samples(jobs, seed, subject_counts=(1, 2))
    worded = [
        dataclasses.replace(
            s,
            prompt=caption_for(
                [x.phrase for x in s.subjects], s.prompt.rsplit(" on ", 1)[1], [x.identity for x in s.subjects]
            ),
        )
        for s in samples
    ]
    rates = {}
    for name, rows in (("class names", samples), ("class names and identity words", worded)):
        with tempfile.TemporaryDirectory() as out:
            results = subject_results(run_world_samples(rows, out, settings, lambda: pipe, scorer))
        rates[name] = summarize(results)["all"]
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help=MODELS_HELP)
    parser.add_argument("--subjects", type=int, default=60, help="held-out subjects asked of each representation")
    parser.add_argument("--jobs", type=int, default=40, help="held-out jobs of 1 and 2 subjects generated per caption")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from msdiffusion.world.weights import world_models, world_pipeline

    paths = world_models(args.models)
    pipe = world_pipeline(paths)
    groups = retrieval_groups(args.subjects, args.seed)
    rivals = np.mean([len(group) - 1 for _, group in groups])
    print(f"| {len(groups)} held-out subjects, {rivals:.0f} same-colour rivals each: retrieved by | share |")
    print("| --- | --- |")
    for name, rate in representation_rates(pipe, groups, args.seed).items():
        print(f"| {name} | {rate:.1%} |")
    print()
    print("| captions of the generated jobs | subjects | found | colours only | identity correct |")
    print("| --- | --- | --- | --- | --- |")
    for name, rates in drawing_rates(pipe, paths, args.jobs, args.seed).items():
        print(
            f"| {name} | {rates['subjects']} | {rates['found']:.1%} | {rates['colours_correct']:.1%} | "
            f"{rates['identity_correct']:.1%} |"
        )


if __name__ == "__main__":
    main()

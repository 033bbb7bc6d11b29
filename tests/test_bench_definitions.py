import itertools
import json
import math
from collections import Counter

import pytest

from msdiffusion.app.cli import main
from msdiffusion.bench.definitions import (
    DATA_DIR,
    check_images,
    load_benchmark,
    load_definition,
    reference_files,
    select_samples,
)


def test_msbench_counts_match_the_paper():
    benchmark = load_benchmark("msbench")
    assert benchmark.num_combinations == 1148
    assert len(benchmark.samples) == 4488
    assert len({s.sample_id for s in benchmark.samples}) == 4488
    assert len(benchmark.groups) == 13
    assert len(benchmark.definition["subjects"]) == 40
    assert len({s["type"] for s in benchmark.definition["subjects"].values()}) == 7


def test_msbench_combinations_follow_the_note():
    """Same-type combinations are unordered choices of distinct subjects; mixed ones take one per type."""
    definition = load_definition("msbench")
    per_type = Counter(s["type"] for s in definition["subjects"].values())
    samples = load_benchmark("msbench").samples
    for name, spec in definition["combination_types"].items():
        types = spec["types"]
        if len(set(types)) == 1:
            expected = math.comb(per_type[types[0]], len(types))
        else:
            expected = math.prod(per_type[t] for t in types)
        mine = [s for s in samples if s.group == name]
        assert len({s.combination for s in mine}) == expected, name
        assert len(mine) == expected * len(spec["prompts"]), name
        for sample in mine:
            assert [definition["subjects"][n]["type"] for n in sample.combination] == types
            assert len(set(sample.combination)) == len(types)
    living_pairs = {frozenset(s.combination) for s in samples if s.group == "living_living"}
    assert len(living_pairs) == math.comb(per_type["living"], 2)  # no (a, b) and (b, a) twice


def test_packaged_msbench_is_the_shared_definition(shared_dir):
    """Every subject, box and prompt template of the packaged copy is the shared msbench.json's, and every
    sample's boxes and prompt come from its combination type's boxes and templates."""
    shared = json.loads((shared_dir / "msbench" / "msbench.json").read_text())
    assert load_definition("msbench") == shared
    for sample in load_benchmark("msbench").samples:
        spec = shared["combination_types"][sample.group]
        assert [list(s.box) for s in sample.subjects] == spec["boxes"]
        template = spec["prompts"][int(sample.sample_id.rsplit(".p", 1)[1])]
        assert sample.prompt == template.format(*(shared["subjects"][n]["class"] for n in sample.combination))
        for subject in sample.subjects:
            assert subject.source == shared["subjects"][subject.name]["file"]
            assert subject.phrase in sample.prompt


def test_dreambench_definition():
    benchmark = load_benchmark("dreambench")
    assert (benchmark.num_combinations, len(benchmark.samples), benchmark.images_per_sample) == (30, 750, 4)
    groups = Counter(s.group for s in benchmark.samples)
    assert groups == {"live": 9 * 25, "object": 21 * 25}
    for sample in benchmark.samples:
        (subject,) = sample.subjects
        assert sample.prompt.startswith("a ") and subject.phrase in sample.prompt and "{" not in sample.prompt
    prompts = benchmark.definition["prompts"]
    assert len(prompts["live"]) == len(prompts["object"]) == 25
    assert prompts["live"][:10] == prompts["object"][:10] and prompts["live"][-5:] == prompts["object"][-5:]


def test_definitions_ship_inside_the_package():
    assert {p.name for p in DATA_DIR.glob("*.json")} >= {"msbench.json", "dreambench.json", "paper_results.json"}


def _touch(path, content=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def test_availability_names_what_is_missing(tmp_path):
    benchmark = load_benchmark("msbench")
    samples = [s for s in benchmark.samples if s.group == "living_living"]
    for name, subject in benchmark.definition["subjects"].items():
        if subject["type"] == "living" and name != "cat1":
            _touch(tmp_path / subject["file"])
    availability = check_images(samples, tmp_path)
    assert list(availability.missing_sources) == ["living/cat1.jpg"]
    unbuildable = availability.unbuildable
    assert len(unbuildable) == 9 * 6  # cat1 pairs with the 9 other living subjects, 6 prompts each
    assert all("cat1" in s.combination for s in unbuildable)
    assert len(availability.buildable) + len(unbuildable) == len(samples)
    lines = availability.describe(tmp_path, len(samples))
    assert lines[0].endswith(f"{len(samples) - 54} of {len(samples)} samples")
    assert "living/cat1.jpg (subject cat1: file not found): 54 samples" in lines[1]


def test_dreambench_references_are_folders(tmp_path):
    _touch(tmp_path / "dog" / "02.jpg")
    _touch(tmp_path / "dog" / "00.jpg")
    _touch(tmp_path / "dog" / "notes.txt")
    (tmp_path / "cat").mkdir()  # a folder without photos cannot serve
    assert [p.name for p in reference_files(tmp_path, "dog")] == ["00.jpg", "02.jpg"]
    samples = [s for s in load_benchmark("dreambench").samples if s.combination in {("dog",), ("cat",)}]
    availability = check_images(samples, tmp_path)
    assert {s.combination for s in availability.buildable} == {("dog",)}
    assert "cat (subject cat: no folder of images): 25 samples" in availability.describe(tmp_path, 50)[1]


def test_shared_msbench_is_missing_only_cat1(shared_dir):
    availability = check_images(load_benchmark("msbench").samples, shared_dir / "msbench")
    assert list(availability.missing_sources) == ["living/cat1.jpg"]
    assert len(availability.buildable) == 4488 - len(availability.unbuildable) > 4000


def test_select_samples():
    benchmark = load_benchmark("msbench")
    by_group = select_samples(benchmark, ["living_scene"])
    assert len(by_group) == 40 and {s.group for s in by_group} == {"living_scene"}
    by_glob = select_samples(benchmark, ["object_object.*.p0", "living_living.cat+cat2.p3"])
    assert len(by_glob) == 45 + 1
    tenth = select_samples(benchmark, fraction=0.1, seed=3)
    assert len(tenth) == round(0.1 * 4488)
    assert [s.sample_id for s in tenth] == [s.sample_id for s in select_samples(benchmark, fraction=0.1, seed=3)]
    assert {s.sample_id for s in tenth} != {s.sample_id for s in select_samples(benchmark, fraction=0.1, seed=4)}
    # the benchmark's order is kept, so shards and reports read in a stable order
    order = {s.sample_id: i for i, s in enumerate(benchmark.samples)}
    assert [order[s.sample_id] for s in tenth] == sorted(order[s.sample_id] for s in tenth)
    assert len(select_samples(benchmark, ["living_scene"], fraction=0.01)) == 1  # never empty
    with pytest.raises(ValueError, match="'nope' match no sample"):
        select_samples(benchmark, ["living_scene", "nope"])
    with pytest.raises(ValueError, match="fraction"):
        select_samples(benchmark, fraction=1.5)


def test_cli_list(capsys, tmp_path):
    assert main(["bench", "list"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("MS-Bench: 1148 combinations, 4488 samples")
    assert "living_object_scene" in out and "400 combinations" in out

    _touch(tmp_path / "photos" / "living" / "dog.jpg")
    assert main(["bench", "list", "--photos", str(tmp_path / "photos")]) == 0
    out = capsys.readouterr().out
    assert "buildable from" in out and ": 0 of 4488 samples" in out and "missing living/cat1.jpg" in out
    assert "missing living/dog.jpg" not in out

    assert main(["bench", "list", "--bench", "dreambench", "--samples"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("DreamBench: 30 subjects, 750 samples")
    assert "dreambench.dog.p10\ta dog wearing a red hat" in out

    assert main(["bench", "list", "--photos", str(tmp_path / "absent")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_cli_list_on_shared_images(capsys, shared_dir):
    assert main(["bench", "list", "--photos", str(shared_dir / "msbench")]) == 0
    out = capsys.readouterr().out
    assert "missing living/cat1.jpg (subject cat1: file not found): 452 samples cannot be built" in out


def test_every_prompt_names_each_subject_in_order():
    """Each phrase must appear in the prompt (in subject order) for the pipeline to locate its tokens."""
    for sample in itertools.chain(load_benchmark("msbench").samples, load_benchmark("dreambench").samples):
        position = 0
        for subject in sample.subjects:
            position = sample.prompt.index(subject.phrase, position) + len(subject.phrase)

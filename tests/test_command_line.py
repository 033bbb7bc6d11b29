"""One command line: every (sub)command described, every option explained with its default, shared names."""

import argparse

import pytest
import yaml

from msdiffusion.app.cli import build_parser, main


def _parsers(parser, path=("msdiff",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


PARSERS = list(_parsers(build_parser()))


@pytest.mark.parametrize("path,parser", PARSERS, ids=[" ".join(p) for p, _ in PARSERS])
def test_every_command_and_option_is_described(path, parser):
    assert parser.description, f"{' '.join(path)} has no description"
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
            continue
        assert action.help, f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest} has no help"
    text = parser.format_help()
    for action in parser._actions:  # a default worth showing is shown
        if (
            action.option_strings
            and action.default not in (None, False, argparse.SUPPRESS)
            and action.help != argparse.SUPPRESS
        ):
            assert "default" in (action.help or "") or "(default:" in text, (path, action.option_strings)


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "denoising steps (default: 30; world: 25)" in text
        and "classifier-free guidance (default: 7.5; world: 5.0)" in text
    )
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 1024x1024)" in text and "(default: 0.6)" in text


def test_version(capsys):
    from msdiffusion import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"msdiff {__version__}"


def test_same_names_across_commands():
    """The job file's vocabulary: --guidance, --scale, --size, --adapter-weight-name, --dtype fp16."""
    parser = build_parser()

    def options(*path):
        sub = parser
        for name in path:
            sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
        return {s for a in sub._actions if a.help != argparse.SUPPRESS for s in a.option_strings}

    generate, bench_run = options("generate"), options("bench", "run")
    for name in (
        "--guidance",
        "--scale",
        "--size",
        "--adapter-weight-name",
        "--steps",
        "--seed",
        "--dtype",
        "--negative-prompt",
    ):
        assert name in generate and name in bench_run, name
    for path in (("convert",), ("inspect",)):
        assert "--adapter-weight-name" in options(*path)
    assert "--photos" in bench_run and "--images" not in bench_run  # --images is a count, in generate
    args = parser.parse_args(["data", "build", "src", "--out", "o", "--dtype", "fp16"])
    assert args.dtype == "fp16"


def test_one_vocabulary_no_second_names(capsys):
    """The pipelines' keyword names are not flags: one name per setting (job files, flags, bench, validation)."""
    parser = build_parser()
    for argv in (
        ["generate", "--guidance-scale", "3"],
        ["generate", "--ms-scale", "0.4"],
        ["convert", "a", "b", "--weight-name", "w"],
        ["bench", "run", "--output", "o", "--height", "64"],
        ["data", "build", "s", "--out", "o", "--dtype", "float16"],
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


def test_train_print_config_template(capsys, tmp_path):
    import dataclasses

    from msdiffusion.train.config import TrainConfig, config_from_dict

    assert main(["train", "--print-config"]) == 0
    text = capsys.readouterr().out
    values = yaml.safe_load(text)
    assert set(values) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert "# training manifest (.jsonl, docs/data.md) (required)" in text and "mixed_precision: 'no'" in text
    values.update(base="b", image_encoder="e", manifest="m.jsonl")
    assert config_from_dict(values) == TrainConfig(base="b", image_encoder="e", manifest="m.jsonl")


def test_library_noise_is_filtered_and_warnings_are_one_line(tmp_path, capsys, monkeypatch):
    import logging
    import warnings

    from msdiffusion.app import cli

    monkeypatch.setattr(cli.warnings, "showwarning", warnings.showwarning)

    def noisy(args):
        logging.getLogger("transformers.utils.import_utils").warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`"
        )
        warnings.warn("Subject phrase 'dog' was not found in the prompt", UserWarning)
        return 0

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    generate = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["generate"]
    generate.set_defaults(func=noisy)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["generate", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "torchvision" not in err
    assert err.strip() == "msdiff generate: warning: Subject phrase 'dog' was not found in the prompt"


def test_quiet_silences_library_progress_bars(monkeypatch):
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        monkeypatch.setenv(name, "")  # restored after the test: quiet_libraries sets them
        monkeypatch.delenv(name)
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    from msdiffusion.app.cli import quiet_libraries

    try:
        quiet_libraries()
        assert not diffusers_logging.is_progress_bar_enabled() and not transformers_logging.is_progress_bar_enabled()
    finally:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()
        diffusers_logging.set_verbosity_warning()
        transformers_logging.set_verbosity_warning()


def test_a_mistaken_flag_is_one_line_from_its_own_command_with_the_closest_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--seeed", "3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == "msdiff generate: error: unrecognized arguments: --seeed (did you mean '--seed'?) (see `msdiff generate --help`)"
    )
    with pytest.raises(SystemExit):
        main(["generate", "--scale", "high"])
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "argument --scale: invalid float value: 'high'" in err  # no 18-line usage
    with pytest.raises(SystemExit):  # an abbreviation is not a flag: it is refused, naming the whole one
        main(["generate", "--stren", "0.5"])
    assert "unrecognized arguments: --stren (did you mean '--strength'?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["world", "evaluate", "--cuont", "3"])
    assert (
        "msdiff world evaluate: error: unrecognized arguments: --cuont 3 (did you mean '--count'?)"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "my_adapter/"],
        ["convert", "nope/", "out"],
        ["generate", "--base", "nope/", "--adapter", "x.png", "--prompt", "a dog", "--subject", "x.png", "dog"],
    ],
)
def test_a_missing_folder_with_a_trailing_slash_is_one_line_not_a_hub_error(args, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import PIL.Image

    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and ("nope/" in err or "my_adapter/" in err), err
    assert "Traceback" not in err and "HFValidationError" not in err


def test_inspect_takes_the_world_set_by_name(capsys):
    from msdiffusion.loading import world_weights_present

    if not world_weights_present():
        pytest.skip("the world's weights are not in the package")
    assert main(["inspect", "msdiff-world", "--json"]) == 0
    assert '"tokens_per_subject": 16' in capsys.readouterr().out


def test_loading_shows_one_bar_not_one_per_model(tmp_path, capfd):
    """diffusers' bar of the pipeline's components stays; transformers' "Loading weights" bar of each text
    encoder and of the image encoder does not."""
    from msdiffusion.loading import load_pipeline
    from msdiffusion.settings import ModelSettings
    from msdiffusion.tiny import save_tiny_models

    paths = save_tiny_models(tmp_path / "tiny")
    capfd.readouterr()
    models = ModelSettings(
        base=str(paths["base"]), adapter=str(paths["adapter"]), image_encoder=str(paths["image_encoder"])
    )
    load_pipeline(models, device="cpu")
    err = capfd.readouterr().err
    assert "Loading pipeline components" in err and "Loading weights" not in err, err


def test_generate_help_names_the_model_sets_and_the_defaults_they_bring(capsys):
    from msdiffusion.loading import NAMED_MODELS, WORLD

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "msdiff-world (its own defaults: size 64x64, steps 25, guidance 5.0, scale 1.0, negative_prompt none)" in text
    )
    assert NAMED_MODELS[WORLD].defaults["steps"] == 25  # the help is made from them

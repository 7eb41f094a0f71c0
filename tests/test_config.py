"""Typed configuration: TOML + --key value overrides, unknown keys and wrong types rejected."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from common.config import COMMAND_LINE_ONLY, ConfigError, load_config, split_config_arg


@dataclass(frozen=True)
class Optim:
    lr: float = 0.01
    nesterov: bool = False


@dataclass(frozen=True)
class Job:
    name: str = "x"
    steps: int = 10
    out: Path = Path("runs")
    devices: tuple[str, ...] = ("cpu",)
    dtype: str | None = None
    optim: Optim = field(default_factory=Optim)
    wipe: bool = field(default=False, metadata={COMMAND_LINE_ONLY: "it deletes things"})


def test_defaults_then_toml_then_flags(tmp_path: Path) -> None:
    toml = tmp_path / "job.toml"
    toml.write_text('name = "from-toml"\nsteps = 5\n[optim]\nlr = 0.1\n')
    cfg = load_config(Job, toml, ["--steps", "7", "--optim.nesterov=true", "--devices", "cuda:0,cuda:1"])
    assert cfg == Job(name="from-toml", steps=7, devices=("cuda:0", "cuda:1"), optim=Optim(lr=0.1, nesterov=True))
    assert load_config(Job, None, ["--dtype", "none"]).dtype is None
    assert split_config_arg(["--config", "a.toml", "--steps", "3"]) == (Path("a.toml"), ["--steps", "3"])


@pytest.mark.parametrize("args, message", [
    (["--stpes", "3"], "unknown key 'stpes'"),
    (["--optim.momentum", "0.9"], "unknown key 'optim.momentum'"),
    (["--steps", "three"], "steps must be int"),
    (["--optim.nesterov", "maybe"], "optim.nesterov must be true or false"),
    (["--steps"], "needs a value"),
])
def test_bad_flags_are_rejected_by_name(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(Job, None, args)


@pytest.mark.parametrize("where, key, meant", [
    ("flag", "stpes", "steps"),  # a typo
    ("flag", "nesterov", "optim.nesterov"),  # a section's key given without its section
    ("flag", "optim.nestrov", "optim.nesterov"),
    ("file", "optimm", "optim"),  # a section's name
])
def test_an_unknown_key_suggests_the_one_meant(where: str, key: str, meant: str, tmp_path: Path) -> None:
    """The line listed the valid keys of the unknown key's level only: ``--batch_size 32`` got the
    service's sixteen top-level names, and ``loader.batch_size`` was not among them."""
    toml = tmp_path / "job.toml"
    toml.write_text(f"[{key}]\nlr = 0.1\n" if where == "file" else "")
    with pytest.raises(ConfigError, match=f"unknown key '{key}' \\(did you mean {meant}\\?\\); valid keys: "):
        load_config(Job, toml, [f"--{key}", "true"] if where == "flag" else [])


def test_a_file_saved_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Windows editors' "UTF-8 with BOM" starts with EF BB BF, invisible in the editor: the line
    was "not valid TOML: Invalid statement (at line 1, column 1)", with nothing there to see."""
    toml = tmp_path / "job.toml"
    toml.write_bytes(b"\xef\xbb\xbfsteps = 5\n")
    assert load_config(Job, toml).steps == 5


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_a_byte_that_is_not_utf8_is_named_at_its_offset_in_the_file(tmp_path: Path, bom: bytes) -> None:
    """The offset was counted after the byte order mark was taken off: 3 bytes short of the
    file's own (a hex editor's, ``cmp``'s) in a file saved as "UTF-8 with BOM"."""
    from tests.conftest import run_module

    toml = tmp_path / "shards.toml"
    toml.write_bytes(bom + b"quality = 90  # caf\xe9 au lait\n")  # a Latin-1 comment
    offset = toml.read_bytes().index(b"\xe9")
    result = run_module("shards", "--config", str(toml), check=False)
    assert (result.returncode, result.stderr) == (2, f"shards: {toml}: not UTF-8 text (byte {offset}: b'\\xe9'); "
                                                     "TOML files are UTF-8: save it as UTF-8\n")


@pytest.mark.parametrize("second", [["--config", "mine.toml"], ["--config=mine.toml"]])
def test_a_second_config_file_is_refused_not_read_instead_of_the_first(second: list[str]) -> None:
    """Only one file is read: ``make demo TRAIN_ARGS="--config mine.toml"`` read mine.toml alone,
    and every setting of configs/demo.toml was dropped without a word."""
    with pytest.raises(ConfigError, match=r"^command line: --config given twice \(configs/demo.toml, then mine.toml\): "
                                          r"one file is read; put the settings in one file, or give the others as "
                                          r"--section.key value$"):
        split_config_arg(["--config", "configs/demo.toml", "--steps", "3", *second])


@pytest.mark.parametrize("args, message", [
    # a traceback: TypeError: 'str' object does not support item assignment
    (["--steps", "3", "--steps.max", "4"], "command line: --steps.max after --steps 3: steps cannot take both a "
                                           "value and keys"),
    (["--optim.lr", "0.1", "--optim.lr.x=2"], "command line: --optim.lr.x after --optim.lr 0.1"),
    (["--steps.max", "4"], "command line: steps is a setting, not a section: it takes a value, not the keys max"),
    # was "steps must be int, got {'max': '4'}"
    # were "steps must be int, got {'': '3'}" and "unknown key 'optim.' (did you mean optim.lr?)"
    (["--steps.", "3"], "command line: --steps. is not a key \\(an empty name beside a dot\\): write --key value "
                        "or --section.key value"),
    (["--optim.=3"], "command line: --optim. is not a key"),
    (["--.steps", "3"], "command line: --.steps is not a key"),
])
def test_a_flag_whose_dots_name_no_key_is_one_clear_error(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{message}"):
        load_config(Job, None, args)


def test_another_tools_file_gets_no_suggestion_that_only_looks_alike() -> None:
    """The sharder's configs/shards-sample.toml given to the service: shard_samples is no typo of
    shards, which the line suggested ("did you mean shards?"); the keys listed say enough."""
    from service.config import TrainConfig

    with pytest.raises(ConfigError, match=r"unknown key 'shard_samples'; valid keys: shards, out, "):
        load_config(TrainConfig, Path(__file__).parents[1] / "configs" / "shards-sample.toml")
    with pytest.raises(ConfigError, match=r"unknown key 'batchsize' \(did you mean loader.batch_size\?\)"):
        load_config(TrainConfig, None, ["--batchsize", "32"])


def test_a_quoted_dotted_key_in_a_file_is_told_to_lose_its_quotes(tmp_path: Path) -> None:
    """``"optim.lr" = 0.1`` is one key named optim.lr at the top, not lr in [optim]: the line said
    "unknown key 'optim.lr' (did you mean optim.lr?)"."""
    toml = tmp_path / "job.toml"
    toml.write_text('"optim.lr" = 0.1\n')
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lr' \(a quoted key names no section: write optim.lr "
                                          r"without the quotes\); valid keys: "):
        load_config(Job, toml)


@pytest.mark.parametrize("args", [["--out", "--steps", "3"], ["--config", "--steps", "3"]])
def test_a_flag_followed_by_a_flag_needs_a_value(args: list[str]) -> None:
    """``--out $RUN --steps 3`` with $RUN empty: out was "--steps" (a directory of that name) and the
    line then complained about "3"; ``--config --steps`` looked for a file named --steps."""
    with pytest.raises(ConfigError, match=f"^command line: {args[0]} needs a value \\(the next argument is the flag "
                                          "--steps: an empty variable\\?\\)$"):
        path, overrides = split_config_arg(args)
        load_config(Job, path, overrides)


def test_bad_toml_is_rejected_naming_the_file(tmp_path: Path) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text("steps = 'ten'\n")
    with pytest.raises(ConfigError, match=f"{toml}: steps must be int"):
        load_config(Job, toml)
    toml.write_text("[optim\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(Job, toml)


def test_an_empty_path_is_rejected_not_read_as_the_working_directory(tmp_path: Path) -> None:
    toml = tmp_path / "job.toml"
    toml.write_text('out = ""\n')
    with pytest.raises(ConfigError, match=f"{toml}: out is empty: give a path"):
        load_config(Job, toml)
    with pytest.raises(ConfigError, match="command line: out is empty"):
        load_config(Job, None, ["--out", " "])
    with pytest.raises(ConfigError, match="command line: --config is empty"):
        split_config_arg(["--config=", "--steps", "3"])
    assert load_config(Job, None, ["--out", "."]).out == Path(".")  # said explicitly, the working directory is fine


def test_a_command_line_only_key_is_refused_in_a_file(tmp_path: Path) -> None:
    toml = tmp_path / "job.toml"
    toml.write_text("steps = 3\nwipe = false\n")
    with pytest.raises(ConfigError, match=f"{toml}: wipe is a command-line-only setting \\(it deletes things\\)"):
        load_config(Job, toml)
    toml.write_text("steps = 3\n")
    assert load_config(Job, toml, ["--wipe", "true"]) == Job(steps=3, wipe=True)


@pytest.mark.parametrize("line, said", [
    ('steps = "24"', "steps must be int (a TOML number, without quotes), got the string '24'"),
    ('steps = " 7 "', "steps must be int (a TOML number, without quotes), got the string ' 7 '"),
    ('[optim]\nlr = "0.1"', "optim.lr must be float (a TOML number, without quotes), got the string '0.1'"),
    ('[optim]\nnesterov = "true"', "optim.nesterov must be true or false (a TOML boolean, without quotes), "
                                   "got the string 'true'"),
    ('devices = "cuda:0,cuda:1"', "devices must be a list (a TOML array: [\"a\", \"b\"]), got the string "
                                  "'cuda:0,cuda:1'"),
])
def test_a_quoted_value_in_a_file_is_refused_for_a_setting_that_is_not_a_string(tmp_path: Path, line: str,
                                                                                said: str) -> None:
    """A TOML value has its type; only the command line's strings are parsed (``--steps 24``).  A
    quoted number in a file passed through the command line's parser before: ``steps = " 7 "`` was 7."""
    toml = tmp_path / "job.toml"
    toml.write_text(line + "\n")
    with pytest.raises(ConfigError) as refused:
        load_config(Job, toml)
    assert str(refused.value) == f"{toml}: {said}"
    toml.write_text('name = "24"\nout = "runs/x"\ndtype = "none"\ndevices = ["cuda:0", "cuda:1"]\n')  # strings stay
    expected = Job(name="24", steps=7, out=Path("runs/x"), devices=("cuda:0", "cuda:1"))
    assert load_config(Job, toml, ["--steps", " 7 "]) == expected

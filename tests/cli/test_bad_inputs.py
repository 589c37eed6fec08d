"""Every bad input is answered by one line naming the file/line/field and the fix, exit code 2, no traceback, and
nothing written: the corpus lives in tests/bad_inputs/ (small files) plus inputs generated here (a 100 MB line,
broken model directories made from a micro random Llama)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ctxstretch.cli import app
from tests.conftest import micro_llama

BAD = Path(__file__).parents[1] / "bad_inputs"
runner = CliRunner()


@dataclass(frozen=True)
class Case:
    """One bad input: the command line ({bad}, {tmp}, {micro}, {out} are filled in), an optional setup that builds
    the input under tmp, and the substrings the one error line must hold (what is wrong, where, and the fix)."""

    args: str
    expect: tuple[str, ...]
    setup: Callable[[Path, Path], None] | None = None


# --------------------------------------------------------------------------------------------------------- setups
def _copy_micro(tmp: Path, micro: Path) -> Path:
    return Path(shutil.copytree(micro, tmp / "m"))


def _edit_config(**changes) -> Callable[[Path, Path], None]:
    def setup(tmp: Path, micro: Path) -> None:
        m = _copy_micro(tmp, micro)
        cfg = json.loads((m / "config.json").read_text())
        (m / "config.json").write_text(json.dumps({**cfg, **changes}))

    return setup


def _no_tokenizer(tmp: Path, micro: Path) -> None:
    m = _copy_micro(tmp, micro)
    for f in m.glob("tokenizer*"):
        f.unlink()


def _config_only(name: str) -> Callable[[Path, Path], None]:
    def setup(tmp: Path, micro: Path) -> None:
        (tmp / "m").mkdir()
        shutil.copy(BAD / name, tmp / "m" / "config.json")

    return setup


def _pickled_only(tmp: Path, micro: Path) -> None:
    import torch
    from safetensors.torch import load_file

    m = _copy_micro(tmp, micro)
    torch.save(load_file(m / "model.safetensors"), m / "pytorch_model.bin")
    (m / "model.safetensors").unlink()


def _huge_line(tmp: Path, micro: Path) -> None:
    """One JSONL record of 100 MB, written in 1 MB pieces (never committed)."""
    piece = "lorem ipsum " * ((1 << 20) // 12)
    with (tmp / "huge.jsonl").open("w") as f:
        f.write('{"text": "')
        written = 0
        while written < 100 * 1024 * 1024:
            f.write(piece)
            written += len(piece)
        f.write('"}\n')


def _huge_text(tmp: Path, micro: Path) -> None:
    """A 100 MB text file of one line (sparse: no disk written)."""
    with (tmp / "huge.txt").open("wb") as f:
        f.truncate(100 * 1024 * 1024)


def _existing_out(tmp: Path, micro: Path) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")


def _out_under_a_file(tmp: Path, micro: Path) -> None:
    (tmp / "file").write_text("a file, not a folder")


def _other_run(tmp: Path, micro: Path) -> None:
    """A run directory left by `extend` with another configuration (target 512)."""
    from ctxstretch.recipes.extend import ExtendConfig

    (tmp / "out").mkdir()
    cfg = ExtendConfig(model=str(micro), target=512, train_length=153)
    (tmp / "out" / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


# ---------------------------------------------------------------------------------------------------------- cases
X = "extend --out {out} --model {micro} --target 256"  # a valid extend command line to spoil
CASES: dict[str, Case] = {
    # data files
    "malformed-jsonl-line": Case("data cip {bad}/malformed.jsonl --length 16 --out {out}",
                                 ("malformed.jsonl:2: invalid JSON", "fix or remove the line", "--on-bad-record")),
    "binary-file-as-text": Case("data pack {bad}/binary.txt --length 16 --out {out}",
                                ("binary.txt:", "binary file (NUL byte)", "remove it from the sources")),
    "empty-text-file": Case("data pack {bad}/empty.txt --length 16 --out {out}",
                            ("empty.txt:1: empty text", "remove the empty file")),
    "empty-jsonl-file": Case("data pack {bad}/empty.jsonl --length 16 --out {out}",
                             ("no usable documents in", "empty.jsonl")),
    "utf16-text-file": Case("data pack {bad}/utf16.txt --length 16 --out {out}",
                            ("utf16.txt:1: UTF-16", "re-encode the file as UTF-8")),
    "utf16-jsonl-file": Case("data pack {bad}/utf16.jsonl --length 16 --out {out}",
                             ("utf16.jsonl:1: undecodable bytes", "re-encode the file as UTF-8")),
    "100mb-single-jsonl-line": Case("data pack {tmp}/huge.jsonl --length 16 --out {out}",
                                    ("huge.jsonl:1: line longer than", "split the document"), _huge_line),
    "100mb-single-line-text": Case("data pack {tmp}/huge.txt --length 16 --out {out}",
                                   ("huge.txt:1: file of 100 MiB", "split the document"), _huge_text),
    "missing-text-field": Case("data pack {bad}/missing_field.jsonl --length 16 --out {out}",
                               ("missing_field.jsonl:1: missing field 'text' (has: body)", "--text-field")),
    "missing-source": Case("data pack {tmp}/nope.jsonl --length 16 --out {out}",
                           ("nope.jsonl: no such file or folder", "pass text/JSONL")),
    "data-zero-length": Case("data pack {bad}/malformed.jsonl --length 0 --out {out}",
                             ("length 0 must be at least 2",)),
    "data-bad-policy": Case("data pack {bad}/malformed.jsonl --on-bad-record ignore --out {out}",
                            ("--on-bad-record must be fail or skip",)),
    "data-existing-out": Case("data pack {bad}/malformed.jsonl --length 16 --out {out}",
                              ("out already exists", "--force"), _existing_out),
    # YAML configs
    "yaml-typo-top-level": Case("extend --config {bad}/typo_top.yaml --out {out}",
                                ("typo_top.yaml", "unknown key 'traget'", "did you mean 'target'")),
    "yaml-typo-nested": Case("extend --config {bad}/typo_train.yaml --out {out}",
                             ("typo_train.yaml", "unknown key 'stpes'", "did you mean 'steps'")),
    "yaml-typo-eval": Case("extend --config {bad}/typo_eval.yaml --out {out}",
                           ("typo_eval.yaml", "unknown key 'lenghts'", "did you mean 'lengths'")),
    "yaml-unknown-key": Case("extend --config {bad}/unknown_key.yaml --out {out}",
                             ("unknown key 'colour'", "valid keys:", "target")),
    "yaml-syntax": Case("extend --config {bad}/broken.yaml --out {out}", ("broken.yaml:2: invalid YAML",)),
    "yaml-not-a-mapping": Case("extend --config {bad}/not_a_mapping.yaml --out {out}",
                               ("not_a_mapping.yaml: expected a mapping",)),
    "yaml-wrong-type": Case("extend --config {bad}/wrong_type.yaml --out {out}",
                            ("wrong_type.yaml: field 'target'", "integer")),
    "yaml-missing-file": Case("extend --config {tmp}/nope.yaml --out {out}", ("No such file", "nope.yaml")),
    # recipes
    "unknown-recipe": Case("train no-such-recipe --out {out}", ("no-such-recipe: no such recipe file or preset",
                                                                 "presets: ", "longrecipe")),
    "recipe-yaml-typo": Case("train {bad}/recipe_typo.yaml --out {out}",
                             ("recipe_typo.yaml", "unknown key 'modle'", "did you mean 'model'")),
    # methods and lengths
    "unknown-method": Case(X + " --method xpos", ("method 'xpos' is unknown", "choose one of", "yarn")),
    "unknown-positions": Case(X + " --positions skip", ("positions 'skip' is unknown", "longrecipe")),
    "negative-steps": Case(X + " --steps -1", ("field 'train.steps'", "greater than or equal to 0")),
    "zero-lr": Case(X + " --lr 0", ("field 'train.lr'", "greater than 0")),
    "negative-target": Case(X.replace("256", "-5"), ("field 'target'", "greater than or equal to 0")),
    "negative-train-length": Case(X + " --train-length -8", ("field 'train_length'",)),
    "negative-lora-rank": Case(X + " --lora-rank -2", ("field 'lora_rank'",)),
    "unknown-device": Case(X + " --device tpu", ("field 'train.device'", "auto|cpu|cuda")),
    "target-equals-window": Case(X.replace("256", "64"), ("target 64 must be larger than the model's window (64)",
                                                          "try target: 1024")),
    "target-below-window": Case(X.replace("256", "32"), ("target 32 must be larger", "try target: 1024")),
    "train-length-above-target": Case(X + " --train-length 512", ("train_length 512 exceeds the stage's target 256",)),
    # model directories
    "model-dir-missing": Case("extend --model {tmp}/nope --out {out}", ("nope: no such directory",
                                                                       "local Hugging Face model directory")),
    "model-dir-without-config": Case("extend --model {tmp} --out {out}", ("no config.json",
                                                                         "not a Hugging Face model directory")),
    "model-config-invalid-json": Case("extend --model {tmp}/m --out {out}",
                                      ("config.json: invalid JSON at line 2",), _config_only("broken_config.json")),
    "model-without-tokenizer": Case("extend --model {tmp}/m --target 256 --out {out}",
                                    ("no tokenizer files", "save the tokenizer"), _no_tokenizer),
    "non-rope-gpt2-model": Case("extend --model {tmp}/m --out {out}", ("no rotary position embedding",),
                                _config_only("gpt2_config.json")),
    "pickled-only-weights": Case("extend --model {tmp}/m --target 256 --out {out}",
                                 ("only pickled .bin", "convert them to safetensors", "--allow-bin"), _pickled_only),
    "remote-code-auto-map": Case("extend --model {tmp}/m --target 256 --out {out}",
                                 ("asks for remote code (auto_map)", "--trust-remote-code"),
                                 _edit_config(auto_map={"AutoModelForCausalLM": "evil.Model"})),
    "eval-remote-code-auto-map": Case("eval --model {tmp}/m --out {out}", ("auto_map", "--trust-remote-code"),
                                      _edit_config(auto_map={"AutoConfig": "evil.Config"})),
    # output paths and flags
    "unwritable-out-extend": Case(X.replace("{out}", "{tmp}/file/out"),
                                  ("file/out: cannot create it", "not a writable folder", "choose another --out"),
                                  _out_under_a_file),
    "unwritable-out-data": Case("data pack {bad}/malformed.jsonl --length 16 --out {tmp}/file/out",
                                ("file/out: cannot create it", "choose another --out"), _out_under_a_file),
    "existing-out-extend": Case(X, ("out already exists", "--resume", "--force"), _existing_out),
    "existing-out-eval": Case("eval --model {micro} --out {out}", ("out already exists", "--force"), _existing_out),
    "conflicting-resume-force": Case(X + " --resume --force", ("--resume and --force conflict",)),
    "resume-different-config": Case(X + " --resume", ("--resume with a different configuration", "config.yaml",
                                                      "--force to start over"), _other_run),
    # eval and report
    "eval-zero-trials": Case("eval --model {micro} --trials 0 --out {out}", ("--trials 0 must be ≥ 1",)),
    "eval-bad-length": Case("eval --model {micro} --lengths 1k,x --out {out}", ("'x' is not a length",
                                                                               "use e.g. 1k,4096")),
    "eval-zero-length": Case("eval --model {micro} --lengths 0 --out {out}", ("--lengths: 0 must be positive",)),
    "eval-unknown-ruler-task": Case("eval --model {micro} --ruler qa --out {out}", ("unknown task 'qa'",
                                                                                   "choose 'all' or from")),
    "report-without-eval": Case("report {tmp}/nothing --out {out}", ("nothing: no eval.json",
                                                                    "pass a run directory")),
}


@pytest.fixture(scope="module")
def micro(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("micro") / "micro"
    micro_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every path under `roots` with its size and modification time: equal snapshots mean nothing was written."""
    return {str(p): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for root in roots for p in [root, *root.rglob("*")]}


def test_every_command_reading_user_input_meets_bad_input_here():
    """Each command that turns files, configs or flags into a run or dataset directory has cases in the table."""
    covered = {case.args.split()[0] for case in CASES.values()}
    assert covered >= {"extend", "eval", "train", "data", "report"}, covered


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_one_line_exit_2_and_writes_nothing(name, tmp_path, micro):
    case = CASES[name]
    if case.setup:
        case.setup(tmp_path, micro)
    before = snapshot(tmp_path, micro)
    args = case.args.format(bad=BAD, tmp=tmp_path, micro=micro, out=tmp_path / "out").split()
    result = runner.invoke(app, args)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    # one error line, the last (a progress note may precede it)
    assert [ln for ln in lines if ln.startswith("error")] == lines[-1:] and lines[-1].startswith("error: "), lines
    for part in case.expect:
        assert part in lines[-1], f"{part!r} not in {lines[-1]!r}"
    assert snapshot(tmp_path, micro) == before, "a failed command wrote something"

"""Bad input ends cleanly, and tampered files are rejected without running anything in them.

Every bad command line, settings file, manifest or dataset must end with exit code 2 and one
`dehbws: error:` message that names the offending value, never a traceback, and must leave an
existing run folder byte for byte as it was. Files that could carry code (settings values, HDF5
shards, supernets, task checkpoints) are refused, and the code in them never runs: each payload
below creates a marker file when it is executed, and the marker must never appear.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import math
import os
import pickle
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from conftest import tiny_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dehbws.cli import main
from dehbws.data.idx import IDX_FILES
from dehbws.model.supernet import build_subnet, inherit
from dehbws.presets import EXECUTORS, METHODS, PRESETS
from dehbws.run_folder import RunFolder, write_json_atomic
from dehbws.space import ACTIVATIONS, OP_KEYS, build_space, to_plain
from dehbws.store import StoreError, check_shard, read_tensors, write_tensors
from dehbws.task import TaskSpec
from dehbws.task_checkpoint import (
    TrainingState,
    checkpoint_path,
    load_training_state,
    save_training_state,
)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
MAX_SEED = 2**32 - 1

# Function-scoped fixtures (tmp_path, capsys) are shared by the examples on purpose: each
# example cleans up after itself, and the checks below are per example.
PROPERTY = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SMALL_PROPERTY = settings(PROPERTY, max_examples=12)

NAME_TEXT = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.", min_size=1
)

Case = tuple[list[str], list[str]]


# -- helpers -------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _keep_root_logging() -> Iterator[None]:
    """The CLI reconfigures the root logger; give the other tests theirs back."""
    root = logging.getLogger()
    handlers, level, raise_exceptions = list(root.handlers), root.level, logging.raiseExceptions
    yield
    for handler in list(root.handlers):
        if handler not in handlers and type(handler) in (
            logging.StreamHandler,
            logging.FileHandler,
        ):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    logging.raiseExceptions = raise_exceptions


def dehbws(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Run the command line in this process; returns the exit code and stdout plus stderr."""
    capsys.readouterr()
    try:
        main(list(args))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    else:
        code = 0
    captured = capsys.readouterr()
    return code, captured.err + "\n" + captured.out


def assert_refused(code: int, output: str, *fragments: str) -> None:
    """Exit code 2, no traceback, and a `dehbws: error:` line that names every fragment."""
    assert "Traceback" not in output, output
    assert code == 2, output
    lines = output.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("dehbws: error:")]
    assert starts, output
    message = "\n".join(lines[starts[0] :])
    for fragment in fragments:
        assert fragment in message, (fragment, output)


def folder_hashes(root: Path) -> dict[str, str]:
    """A content hash of every file below `root`, by relative path."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def marker_payload(marker: Path) -> Any:
    """An object that creates `marker` when a pickle of it is loaded."""

    class Payload:
        def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
            return os.system, (f"touch '{marker}'",)

    return Payload()


def test_the_payloads_are_live(tmp_path: Path) -> None:
    """Loading the pickles used below with plain pickle does run their code."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(marker_payload(marker)))
    assert marker.exists()
    marker.unlink()
    torch.save(marker_payload(marker), tmp_path / "payload.pt")
    torch.load(tmp_path / "payload.pt", weights_only=False)
    assert marker.exists()


# -- A: the command line ----------------------------------------------------------------------


def _not_parsed_by(parse: Callable[[str], Any]) -> Callable[[str], bool]:
    def rejected(text: str) -> bool:
        try:
            parse(text)
        except ValueError:
            return True
        return False

    return rejected


def _option_case(
    option: str, values: st.SearchStrategy[Any], field: str
) -> st.SearchStrategy[Case]:
    return values.map(lambda value: ([f"{option}={value}"], [f"{field} is {value!r}"]))


INT_TEXT = st.text(alphabet="0123456789abcxyz.,+-eE", min_size=1).filter(_not_parsed_by(int))
FLOAT_TEXT = st.text(alphabet="0123456789abcxyz.,+-", min_size=1).filter(_not_parsed_by(float))
BAD_FRACTION = st.floats(allow_nan=True).filter(lambda x: not 0.0 < x <= 1.0)
BAD_TIMEOUT = st.floats(allow_nan=True).filter(lambda x: not 0.0 < x < math.inf)
BAD_DEVICE = st.one_of(
    NAME_TEXT.filter(lambda text: text.split(":")[0] not in ("cpu", "cuda")),
    st.tuples(st.sampled_from(["cpu", "cuda"]), NAME_TEXT.filter(lambda t: not t.isdigit())).map(
        ":".join
    ),
)


def _budget_cases() -> st.SearchStrategy[Case]:
    min_above_max = st.integers(1, 10**6).flatmap(
        lambda low: st.integers(max_value=low).map(
            lambda high: (
                [f"--min-epochs={low}", f"--max-epochs={high}"],
                [f"min_epochs is {low}", f"max_epochs {high}"],
            )
        )
    )
    above_schedule = st.one_of(st.integers(201, 10**4), st.integers(10**4, 10**400)).map(
        lambda high: (
            ["--min-epochs=1", f"--max-epochs={high}", "--eta=3"],
            [f"max_epochs is {high}"],
        )
    )
    return st.one_of(
        min_above_max,
        above_schedule,
        _option_case("--min-epochs", st.integers(max_value=0), "min_epochs"),
        _option_case("--eta", st.integers(max_value=1), "eta"),
        _option_case("--warmup-epochs", st.integers(201, 10**6), "warmup_epochs"),
    )


def _value_cases() -> st.SearchStrategy[Case]:
    return st.one_of(
        _option_case("--fevals", st.integers(max_value=0), "fevals"),
        _option_case("--warmup-epochs", st.integers(max_value=-1), "warmup_epochs"),
        _option_case("--finetune-epochs", st.integers(max_value=-1), "finetune_epochs"),
        _option_case("--max-retries", st.integers(max_value=-1), "max_retries"),
        _option_case(
            "--seed", st.one_of(st.integers(max_value=-1), st.integers(min_value=2**32)), "seed"
        ),
        BAD_FRACTION.map(lambda x: ([f"--subset-fraction={x!r}"], [f"subset_fraction is {x!r}"])),
        BAD_TIMEOUT.map(lambda x: ([f"--task-timeout-min={x!r}"], [f"task_timeout_min is {x!r}"])),
        _option_case("--device", BAD_DEVICE, "device"),
        NAME_TEXT.filter(lambda name: name not in PRESETS).map(
            lambda name: ([f"--preset={name}"], [repr(name)])
        ),
    )


def _choice_and_type_cases() -> st.SearchStrategy[Case]:
    """Mistakes the option parser itself catches: unknown choices and unparsable numbers."""
    choices = {
        "--executor": ("debug", "local"),
        "--split": ("jahs", "official"),
        "--precision": ("fp32", "bf16"),
        "--method": ("dehb-ws", "dehb", "smac"),
    }
    unknown_choice = st.sampled_from(sorted(choices)).flatmap(
        lambda option: NAME_TEXT.filter(lambda name: name not in choices[option]).map(
            lambda name: ([f"{option}={name}"], [repr(name), option])
        )
    )
    int_options = ["--fevals", "--min-epochs", "--max-epochs", "--eta", "--seed", "--max-retries"]
    not_an_int = st.tuples(st.sampled_from(int_options), INT_TEXT).map(
        lambda pair: ([f"{pair[0]}={pair[1]}"], [repr(pair[1]), pair[0]])
    )
    not_a_float = st.tuples(
        st.sampled_from(["--subset-fraction", "--task-timeout-min"]), FLOAT_TEXT
    ).map(lambda pair: ([f"{pair[0]}={pair[1]}"], [repr(pair[1]), pair[0]]))
    no_parallelism = st.integers(max_value=0).map(
        lambda n: ([f"--max-parallel={n}"], [str(n), "--max-parallel"])
    )
    return st.one_of(unknown_choice, not_an_int, not_a_float, no_parallelism)


@PROPERTY
@given(case=st.one_of(_budget_cases(), _value_cases(), _choice_and_type_cases()))
def test_bad_run_options_are_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: Case
) -> None:
    args, fragments = case
    run_dir = tmp_path / "run"
    code, output = dehbws(capsys, "run", "--preset=tiny", f"--run-dir={run_dir}", *args)
    assert_refused(code, output, *fragments)
    assert not run_dir.exists()


@SMALL_PROPERTY
@given(
    case=st.one_of(
        BAD_FRACTION.map(lambda x: ([f"--subset-fraction={x!r}"], [f"subset_fraction is {x!r}"])),
        st.floats(allow_nan=False)
        .filter(lambda x: x not in (0.25, 0.5, 1.0))
        .map(lambda x: ([f"--resolution={x!r}"], [repr(repr(x))])),
        NAME_TEXT.filter(lambda name: name not in ("jahs", "official")).map(
            lambda name: ([f"--split={name}"], [repr(name)])
        ),
    )
)
def test_bad_data_options_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: Case
) -> None:
    args, fragments = case
    out = tmp_path / "prepared"
    code, output = dehbws(capsys, "data", f"--out={out}", *args)
    assert_refused(code, output, *fragments)
    assert not out.exists()


# -- A: the data ------------------------------------------------------------------------------


def _corruptions() -> st.SearchStrategy[tuple[str, Callable[[bytes], bytes], str]]:
    """(IDX file key, a change of its decompressed bytes, whether it is stored raw or gzipped)."""
    truncate = st.integers(0, 2000).map(lambda n: lambda data: data[:n])
    garbage = st.binary(max_size=64).map(lambda junk: lambda data: junk)
    wrong_magic = st.integers(0, 2**32 - 1).filter(lambda m: m not in (2049, 2051))
    remagic = wrong_magic.map(lambda m: lambda data: m.to_bytes(4, "big") + data[4:])
    extra = st.binary(min_size=1, max_size=16).map(lambda junk: lambda data: data + junk)
    return st.tuples(
        st.sampled_from(["test_images", "test_labels", "train_labels"]),
        st.one_of(truncate, garbage, remagic, extra),
        st.sampled_from(["raw", "gz", "truncated-gz"]),
    )


@pytest.fixture(scope="module")
def idx_bytes() -> dict[str, bytes]:
    """The decompressed small IDX files (the 47 MB training images are not needed)."""
    return {
        key: gzip.decompress((FASHION_MNIST_DIR / f"{IDX_FILES[key]}.gz").read_bytes())
        for key in ("test_images", "test_labels", "train_labels")
    }


def _data_folder(root: Path, skip: set[str] = frozenset()) -> Path:  # type: ignore[assignment]
    folder = Path(tempfile.mkdtemp(dir=root))
    for key, name in IDX_FILES.items():
        if key not in skip:
            (folder / f"{name}.gz").symlink_to(FASHION_MNIST_DIR / f"{name}.gz")
    return folder


@SMALL_PROPERTY
@given(corruption=_corruptions(), command=st.sampled_from(["data", "data", "run"]))
def test_corrupt_idx_files_are_a_clear_error(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    idx_bytes: dict[str, bytes],
    corruption: tuple[str, Callable[[bytes], bytes], str],
    command: str,
) -> None:
    key, change, storage = corruption
    folder = _data_folder(tmp_path, skip={key})
    name = IDX_FILES[key]
    content = change(idx_bytes[key])
    if storage == "raw":
        path = folder / name
        path.write_bytes(content)
    else:
        path = folder / f"{name}.gz"
        packed = gzip.compress(content)
        path.write_bytes(packed[: len(packed) // 2] if storage == "truncated-gz" else packed)
    if content == idx_bytes[key] and storage != "truncated-gz":
        return  # an unchanged file is no corruption

    target = Path(tempfile.mkdtemp(dir=tmp_path)) / "out"
    if command == "data":
        args = ["data", f"--out={target}", f"--data-dir={folder}"]
    else:
        args = ["run", "--preset=tiny", f"--run-dir={target}", f"--data-dir={folder}"]
    code, output = dehbws(capsys, *args)
    assert_refused(code, output, path.name, str(folder))


@SMALL_PROPERTY
@given(missing=st.sets(st.sampled_from(sorted(IDX_FILES)), min_size=1))
def test_missing_idx_files_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], missing: set[str]
) -> None:
    folder = _data_folder(tmp_path, skip=missing)
    code, output = dehbws(capsys, "data", f"--out={tmp_path / 'out'}", f"--data-dir={folder}")
    assert_refused(code, output, str(folder), *(IDX_FILES[key] for key in missing))


# -- A: settings files ------------------------------------------------------------------------

SECTIONS = ("network", "data", "train", "search")


def _leaves(values: dict[str, Any]) -> list[tuple[str | None, str]]:
    """(section or None for the top level, key) of every plain value in a settings dict."""
    leaves: list[tuple[str | None, str]] = []
    for key, value in values.items():
        if isinstance(value, dict):
            leaves.extend((key, inner) for inner in value)
        else:
            leaves.append((None, key))
    return leaves


TINY = tiny_settings().to_dict()
LEAVES = _leaves(TINY)
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    NAME_TEXT,
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(NAME_TEXT, inner, max_size=3)
    ),
    max_leaves=5,
)


def _fits(default: Any, key: str, value: Any) -> bool:
    """Whether `value` has the JSON type of the settings field whose default is `default`."""
    if key == "data_dir":
        return value is None or isinstance(value, str)
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, type(default))


def _edit(values: dict[str, Any], section: str | None, key: str, value: Any) -> dict[str, Any]:
    edited = json.loads(json.dumps(values))
    (edited if section is None else edited[section])[key] = value
    return edited


def _wrong_type() -> st.SearchStrategy[tuple[bytes, list[str]]]:
    def case(leaf: tuple[str | None, str]) -> st.SearchStrategy[tuple[bytes, list[str]]]:
        section, key = leaf
        default = TINY[key] if section is None else TINY[section][key]
        return JSON_VALUES.filter(lambda value: not _fits(default, key, value)).map(
            lambda value: (
                json.dumps(_edit(TINY, section, key, value)).encode(),
                [f"{section or 'settings'}.{key} is {value!r}"],
            )
        )

    return st.sampled_from(LEAVES).flatmap(case)


def _out_of_range() -> st.SearchStrategy[tuple[bytes, list[str]]]:
    def at(
        section: str | None, key: str, values: st.SearchStrategy[Any]
    ) -> st.SearchStrategy[tuple[bytes, list[str]]]:
        return values.map(
            lambda value: (
                json.dumps(_edit(TINY, section, key, value)).encode(),
                [f"{key} is {value!r}"],
            )
        )

    def other_text(known: tuple[str, ...]) -> st.SearchStrategy[str]:
        return NAME_TEXT.filter(lambda text: text not in known)

    return st.one_of(
        at("search", "fevals", st.integers(max_value=0)),
        at("search", "eta", st.integers(max_value=1)),
        at("search", "min_epochs", st.integers(max_value=0)),
        at("search", "seed", st.one_of(st.integers(max_value=-1), st.integers(MAX_SEED + 1))),
        at("search", "warmup_subnets", st.integers(max_value=0)),
        at("search", "method", other_text(METHODS)),
        at("network", "width", st.integers(max_value=0)),
        at(
            "network",
            "resolution",
            st.floats(0.0, 4.0).filter(lambda x: x not in (0.25, 0.5, 1.0)),
        ),
        at("data", "split", other_text(("jahs", "official"))),
        at("data", "subset_fraction", st.floats(-5.0, 5.0).filter(lambda x: not 0 < x <= 1)),
        at("train", "batch_size", st.integers(max_value=0)),
        at("train", "device", BAD_DEVICE),
        at("train", "precision", other_text(("fp32", "bf16"))),
        at(None, "executor", other_text(EXECUTORS)),
        at(None, "max_parallel_tasks", st.integers(max_value=0)),
        at(None, "task_timeout_min", st.floats(-1e9, 0.0)),
        at(None, "preset", st.just("")),
    )


def _bad_structure() -> st.SearchStrategy[tuple[bytes, list[str]]]:
    def without(leaf: tuple[str | None, str]) -> tuple[bytes, list[str]]:
        section, key = leaf
        edited = json.loads(json.dumps(TINY))
        del (edited if section is None else edited[section])[key]
        return json.dumps(edited).encode(), [repr(key)]

    optional = {"channels_last", "precision", "compile"}
    missing = st.sampled_from(
        [leaf for leaf in LEAVES if leaf[1] not in optional] + [(None, s) for s in SECTIONS]
    ).map(without)
    unknown = st.tuples(
        st.sampled_from([None, *SECTIONS]),
        NAME_TEXT.filter(
            lambda key: key not in TINY and all(key not in TINY[s] for s in SECTIONS)
        ),
        JSON_SCALARS,
    ).map(lambda t: (json.dumps(_edit(TINY, t[0], t[1], t[2])).encode(), [repr(t[1])]))
    not_a_section = st.tuples(
        st.sampled_from(SECTIONS), JSON_VALUES.filter(lambda v: not isinstance(v, dict))
    ).map(lambda t: (json.dumps(_edit(TINY, None, t[0], t[1])).encode(), [repr(t[0]), repr(t[1])]))
    not_an_object = JSON_VALUES.filter(lambda v: not isinstance(v, dict)).map(
        lambda v: (json.dumps(v).encode(), [f"got {type(v).__name__}"])
    )

    def not_json(data: bytes) -> bool:
        try:
            json.loads(data.decode())
        except ValueError:  # UnicodeDecodeError included
            return True
        return False

    garbage = st.one_of(
        st.binary(max_size=40),
        st.integers(1, len(json.dumps(TINY)) - 1).map(lambda n: json.dumps(TINY).encode()[:n]),
    ).filter(not_json)
    return st.one_of(
        missing,
        unknown,
        not_a_section,
        not_an_object,
        garbage.map(lambda data: (data, ["settings.json", "not valid JSON"])),
    )


@pytest.fixture
def run_folder(new_run: Callable[..., RunFolder]) -> RunFolder:
    """A run interrupted after its first batch was written down, before any task ran."""
    folder = new_run(tiny_settings())
    space = build_space(seed=1)
    jobs = [
        {
            "bracket": 0,
            "config": to_plain(space.sample_configuration()),
            "config_id": index,
            "fidelity_epochs": 1,
            "index": index,
            "parent_id": None,
            "rung": 0,
            "start_epoch": 0,
        }
        for index in range(2)
    ]
    write_json_atomic(
        folder.manifest_path(0), {"base_version": 0, "batch": 0, "jobs": jobs, "kind": "warmup"}
    )
    return folder


def _resume_commands(root: Path) -> st.SearchStrategy[list[str]]:
    return st.sampled_from(
        [
            ["run", f"--resume={root}"],
            ["run", f"--resume={root}", "--executor=debug", "--max-parallel=2"],
            ["status", str(root)],
            ["finetune", str(root), "--epochs=1", "--executor=debug"],
        ]
    )


def _refused_edit(
    capsys: pytest.CaptureFixture[str],
    root: Path,
    path: Path,
    content: bytes,
    command: list[str],
    fragments: list[str],
) -> None:
    """Write `content` to `path`, run `command`: refused, and nothing else in the folder moves."""
    original = path.read_bytes()
    path.write_bytes(content)
    try:
        before = folder_hashes(root)
        code, output = dehbws(capsys, *command)
        assert_refused(code, output, *fragments)
        assert folder_hashes(root) == before
    finally:
        path.write_bytes(original)


@PROPERTY
@given(data=st.data(), edit=st.one_of(_wrong_type(), _out_of_range(), _bad_structure()))
def test_a_bad_settings_file_is_refused_and_the_folder_kept(
    capsys: pytest.CaptureFixture[str],
    run_folder: RunFolder,
    data: st.DataObject,
    edit: tuple[bytes, list[str]],
) -> None:
    content, fragments = edit
    command = data.draw(_resume_commands(run_folder.root), label="command")
    _refused_edit(
        capsys, run_folder.root, run_folder.root / "settings.json", content, command, fragments
    )


def _config_edits() -> st.SearchStrategy[tuple[str, Any, list[str]]]:
    """(key of a configuration, its new value or `...` to remove it, expected fragments)."""
    not_an_int = JSON_VALUES.filter(lambda v: isinstance(v, bool) or not isinstance(v, int))
    ops = st.tuples(
        st.sampled_from(OP_KEYS),
        st.one_of(st.integers(max_value=-1), st.integers(min_value=5), not_an_int),
    )
    not_a_number = JSON_VALUES.filter(
        lambda v: isinstance(v, bool) or not isinstance(v, (int, float))
    )
    learning_rate = st.one_of(
        st.floats(allow_nan=True).filter(lambda x: not 1e-3 <= x <= 1.0), not_a_number
    )
    weight_decay = st.one_of(
        st.floats(allow_nan=True).filter(lambda x: not 1e-5 <= x <= 1e-2), not_a_number
    )
    values = st.one_of(
        ops,
        st.tuples(st.just("LearningRate"), learning_rate),
        st.tuples(st.just("WeightDecay"), weight_decay),
        st.tuples(st.just("Activation"), JSON_VALUES.filter(lambda v: v not in ACTIVATIONS)),
        st.tuples(
            st.just("TrivialAugment"), JSON_VALUES.filter(lambda v: not isinstance(v, bool))
        ),
    ).map(lambda pair: (pair[0], pair[1], [f"{pair[0]} is {pair[1]!r}"]))
    removed = st.sampled_from([*OP_KEYS, "Activation", "LearningRate"]).map(
        lambda key: (key, ..., [repr(key)])
    )
    known = {*OP_KEYS, "Activation", "LearningRate", "WeightDecay", "TrivialAugment"}
    added = NAME_TEXT.filter(lambda key: key not in known).map(lambda key: (key, 1, [repr(key)]))
    return st.one_of(values, removed, added)


def _manifest_content(
    manifest: dict[str, Any], edit: tuple[str, Any, list[str]], job: int
) -> tuple[bytes, list[str]]:
    key, value, fragments = edit
    edited = json.loads(json.dumps(manifest))
    config = edited["jobs"][job]["config"]
    if value is ...:
        del config[key]
    else:
        config[key] = value
    return json.dumps(edited).encode(), [*fragments, "outside the search space"]


@PROPERTY
@given(data=st.data())
def test_a_manifest_outside_the_search_space_is_refused_and_the_folder_kept(
    capsys: pytest.CaptureFixture[str], run_folder: RunFolder, data: st.DataObject
) -> None:
    path = run_folder.manifest_path(0)
    manifest = json.loads(path.read_text())
    broken_manifests = st.sampled_from(
        [
            [],
            {"jobs": 5},
            {"jobs": "Op1"},
            {"jobs": [1, 2]},
            {"jobs": [{"config": [1]}]},
            {"configs": None},
        ]
    ).map(lambda value: (json.dumps(value).encode(), ["not a dehbws manifest"]))
    content, fragments = data.draw(
        st.one_of(
            st.tuples(_config_edits(), st.integers(0, len(manifest["jobs"]) - 1)).map(
                lambda pair: _manifest_content(manifest, *pair)
            ),
            broken_manifests,
        )
    )
    command = data.draw(
        _resume_commands(run_folder.root).filter(lambda c: c[0] == "run"), label="command"
    )
    _refused_edit(capsys, run_folder.root, path, content, command, [str(path), *fragments])


@SMALL_PROPERTY
@given(
    args=st.one_of(
        NAME_TEXT.filter(lambda n: n not in ("debug", "local")).map(
            lambda name: [f"--executor={name}", repr(name)]
        ),
        st.integers(max_value=0).map(lambda n: [f"--max-parallel={n}", str(n)]),
        st.integers(1, 100).map(lambda n: [f"--fevals={n}", "'fevals'"]),
        st.sampled_from(["cpu", "cuda"]).map(lambda d: [f"--device={d}", "'device'"]),
    )
)
def test_bad_options_on_resume_leave_the_folder_alone(
    capsys: pytest.CaptureFixture[str], run_folder: RunFolder, args: list[str]
) -> None:
    option, fragment = args
    before = folder_hashes(run_folder.root)
    code, output = dehbws(capsys, "run", f"--resume={run_folder.root}", option)
    assert_refused(code, output, fragment)
    assert folder_hashes(run_folder.root) == before


# -- B: nobody else's code runs ----------------------------------------------------------------


def _code_strings(marker: Path) -> st.SearchStrategy[str]:
    return st.sampled_from(
        [
            f"__import__('os').system('touch {marker}')",
            f"eval(\"__import__('os').system('touch {marker}')\")",
            f"exec('import os; os.system(\"touch {marker}\")')",
            f"(lambda: __import__('pathlib').Path('{marker}').touch())()",
            f"{{__import__('os').system('touch {marker}')}}",
            f"$(touch {marker})",
            f"`touch {marker}`; touch {marker}",
        ]
    )


# Fields where no string is valid, and string fields with a fixed set of values.
CODE_LEAVES = [leaf for leaf in LEAVES if leaf[1] not in ("preset", "data_dir")]


@PROPERTY
@given(data=st.data())
def test_code_in_a_settings_file_is_refused_not_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], run_folder: RunFolder, data: st.DataObject
) -> None:
    marker = tmp_path / "PWNED"
    code_text = data.draw(_code_strings(marker), label="code")
    section, key = data.draw(st.sampled_from(CODE_LEAVES), label="field")
    content = json.dumps(_edit(TINY, section, key, code_text)).encode()
    command = data.draw(_resume_commands(run_folder.root), label="command")
    _refused_edit(
        capsys,
        run_folder.root,
        run_folder.root / "settings.json",
        content,
        command,
        [key, repr(code_text)],
    )
    assert not marker.exists()
    assert not list(tmp_path.rglob("PWNED"))


@SMALL_PROPERTY
@given(data=st.data())
def test_code_in_free_text_settings_is_only_ever_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], run_folder: RunFolder, data: st.DataObject
) -> None:
    """The preset name and the data folder may be any text: it is shown, never run."""
    marker = tmp_path / "PWNED"
    code_text = data.draw(_code_strings(marker), label="code")
    settings_path = run_folder.root / "settings.json"
    original = settings_path.read_bytes()
    edited = _edit(_edit(TINY, None, "preset", code_text), "data", "data_dir", code_text)
    settings_path.write_text(json.dumps(edited))
    try:
        code, output = dehbws(capsys, "status", str(run_folder.root))
    finally:
        settings_path.write_bytes(original)
    assert code == 0, output
    assert f"(preset {code_text})" in output
    assert not marker.exists()


SUPERNET_TENSORS = {
    "stem.0.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
    "stem.1.bias": np.ones(4, dtype=np.float32),
    "stem.1.num_batches_tracked": np.array(3, dtype=np.int64),
}


def _weight_files(root: Path) -> tuple[Path, Path]:
    folder = Path(tempfile.mkdtemp(dir=root))
    supernet, shard = folder / "v0000.h5", folder / "e00000.h5"
    write_tensors(supernet, SUPERNET_TENSORS, {"version": 0})
    write_tensors(shard, {k: v + 1 for k, v in SUPERNET_TENSORS.items()}, {"evaluation": 0})
    check_shard(shard, supernet, expected_names=list(SUPERNET_TENSORS))  # intact: accepted
    return supernet, shard


def _plant(file: h5py.File, name: str, kind: str, blob: bytes) -> None:
    """Replace the tensor `name` with something that is no plain numeric dataset."""
    del file[name]
    if kind == "opaque":
        file[name] = np.void(blob)
    elif kind == "opaque-array":
        file[name] = np.array([np.void(blob)] * 2)
    elif kind == "vlen-bytes":
        ragged = np.empty(1, dtype=h5py.vlen_dtype(np.dtype("uint8")))
        ragged[0] = np.frombuffer(blob, dtype=np.uint8)
        file.create_dataset(name, data=ragged)
    elif kind == "string":
        file.create_dataset(name, data=[blob.hex()], dtype=h5py.string_dtype())
    elif kind == "fixed-bytes":
        file[name] = np.array([blob])
    elif kind == "soft-link":
        file[name] = h5py.SoftLink("/" + next(k for k in SUPERNET_TENSORS if k != name))
    elif kind == "external-link":
        file[name] = h5py.ExternalLink("payload.h5", "/x")
    elif kind == "group":
        file.create_group(name).attrs["payload"] = np.void(blob)
    else:
        raise AssertionError(kind)


@PROPERTY
@given(
    name=st.sampled_from(sorted(SUPERNET_TENSORS)),
    kind=st.sampled_from(
        [
            "opaque",
            "opaque-array",
            "vlen-bytes",
            "string",
            "fixed-bytes",
            "soft-link",
            "external-link",
            "group",
        ]
    ),
    protocol=st.integers(0, pickle.HIGHEST_PROTOCOL),
)
def test_a_shard_carrying_a_pickle_is_rejected_not_loaded(
    tmp_path: Path, name: str, kind: str, protocol: int
) -> None:
    marker = tmp_path / "PWNED"
    supernet, shard = _weight_files(tmp_path)
    blob = pickle.dumps(marker_payload(marker), protocol=protocol)
    with h5py.File(shard, "r+", locking=False) as file:
        _plant(file, name, kind, blob)

    with pytest.raises(StoreError) as raised:
        check_shard(shard, supernet, expected_names=list(SUPERNET_TENSORS))
    assert repr(name) in str(raised.value)
    assert str(shard) in str(raised.value)
    if kind not in ("soft-link", "external-link", "group"):
        read_tensors(shard)  # reading hands back bytes; nothing is unpickled
    assert not marker.exists()


@PROPERTY
@given(
    name=st.sampled_from(sorted(SUPERNET_TENSORS)),
    change=st.one_of(
        st.lists(st.integers(0, 5), max_size=4).map(lambda shape: ("shape", tuple(shape))),
        st.sampled_from(
            ["float16", "float64", "int8", "int32", "int64", "uint8", "bool", "float32"]
        ).map(lambda dtype: ("dtype", np.dtype(dtype))),
    ),
    tampered=st.sampled_from(["shard", "supernet"]),
)
def test_a_tensor_of_the_wrong_shape_or_dtype_is_rejected(
    tmp_path: Path, name: str, change: tuple[str, Any], tampered: str
) -> None:
    supernet, shard = _weight_files(tmp_path)
    original = SUPERNET_TENSORS[name]
    what, new = change
    if what == "shape":
        replacement = np.zeros(new, dtype=original.dtype)
        if replacement.shape == original.shape:
            return
    else:
        if new == original.dtype:
            return
        replacement = original.astype(new)
    with h5py.File(shard if tampered == "shard" else supernet, "r+", locking=False) as file:
        del file[name]
        file[name] = replacement

    with pytest.raises(StoreError) as raised:
        check_shard(shard, supernet, expected_names=list(SUPERNET_TENSORS))
    message = str(raised.value)
    assert repr(name) in message
    assert (str(replacement.shape) if what == "shape" else str(replacement.dtype)) in message


@pytest.fixture(scope="module")
def subnet() -> torch.nn.Module:
    config = to_plain(build_space(seed=2).sample_configuration())
    config.update({"Op1": 2, "Op2": 2, "Op3": 2, "Op4": 2, "Op5": 2, "Op6": 2})
    return build_subnet(config, tiny_settings().network)


@SMALL_PROPERTY
@given(data=st.data())
def test_a_supernet_tensor_that_does_not_fit_the_subnet_is_refused(
    tmp_path: Path, subnet: torch.nn.Module, data: st.DataObject
) -> None:
    state = {name: tensor.numpy().copy() for name, tensor in subnet.state_dict().items()}
    name = data.draw(st.sampled_from(sorted(state)), label="tensor")
    kind = data.draw(st.sampled_from(["shape", "opaque"]), label="kind")
    marker = tmp_path / "PWNED"
    if kind == "shape":
        shape = data.draw(
            st.lists(st.integers(0, 4), max_size=4).filter(lambda s: tuple(s) != state[name].shape)
        )
        state[name] = np.zeros(shape, dtype=state[name].dtype)
    else:
        state[name] = np.void(pickle.dumps(marker_payload(marker)))
    path = tmp_path / "supernet.h5"
    write_tensors(path, state, {"version": 1})

    with pytest.raises((ValueError, TypeError)) as raised:
        inherit(subnet, read_tensors(path, list(state)))
    if kind == "shape":
        assert name in str(raised.value)
    assert not marker.exists()


@SMALL_PROPERTY
@given(umask=st.integers(0, 0o777), exists=st.booleans())
def test_a_run_folder_is_never_world_writable(tmp_path: Path, umask: int, exists: bool) -> None:
    root = Path(tempfile.mkdtemp(dir=tmp_path)) / "run"
    if exists:
        root.mkdir(mode=0o777)
        os.chmod(root, 0o777)
    previous = os.umask(umask)
    try:
        RunFolder(root).create(tiny_settings())
    finally:
        os.umask(previous)
    assert stat.S_IMODE(root.stat().st_mode) & 0o002 == 0
    assert stat.S_IMODE(root.stat().st_mode) & 0o007 == 0
    for path in root.rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) & 0o002 == 0, path


def _spec(folder: Path) -> TaskSpec:
    settings = tiny_settings()
    return TaskSpec(
        kind="scratch",
        batch=0,
        evaluation=0,
        config=to_plain(build_space(seed=3).sample_configuration()),
        base_version=None,
        base_supernet=None,
        start_epoch=0,
        end_epoch=3,
        seed=11,
        shard=str(folder / "e00000.h5"),
        result=str(folder / "e00000.json"),
        network=settings.network,
        data=settings.data,
        train=dataclasses.replace(settings.train, num_threads=1),
        data_cache_dir=str(folder / "cache"),
    )


def _genuine_payload(spec: TaskSpec) -> dict[str, Any]:
    """What dehbws itself writes as the checkpoint of `spec` (read back without any code)."""
    save_training_state(
        spec,
        TrainingState(
            next_epoch=1,
            model={"w": torch.ones(2)},
            optimizer={"state": {}, "param_groups": []},
            train_seconds=1.0,
            images_seen=10,
        ),
    )
    payload = torch.load(checkpoint_path(spec), weights_only=True)
    assert isinstance(payload, dict)
    return payload


@PROPERTY
@given(
    where=st.sampled_from(["whole", "model", "optimizer", "next_epoch", "raw-pickle"]),
    protocol=st.integers(2, pickle.HIGHEST_PROTOCOL),
)
def test_a_malicious_task_checkpoint_is_refused_not_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, where: str, protocol: int
) -> None:
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    marker = folder / "PWNED"
    spec = _spec(folder)
    path = checkpoint_path(spec)
    evil = marker_payload(marker)
    if where == "raw-pickle":
        path.write_bytes(pickle.dumps(evil, protocol=protocol))
    elif where == "whole":
        torch.save(evil, path, pickle_protocol=protocol)
    else:
        payload = _genuine_payload(spec)
        payload[where] = evil
        torch.save(payload, path, pickle_protocol=protocol)

    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dehbws"):
        assert load_training_state(spec) is None
    assert any(str(path) in record.getMessage() for record in caplog.records)
    assert not marker.exists()


@PROPERTY
@given(
    change=st.one_of(
        st.sampled_from(["next_epoch", "model", "optimizer", "train_seconds", "images_seen"]).map(
            lambda key: (key, ...)
        ),
        st.tuples(
            st.sampled_from(["next_epoch", "model", "optimizer", "train_seconds", "images_seen"]),
            st.one_of(st.none(), st.text(max_size=5), st.lists(st.integers(), max_size=2)),
        ),
        st.sampled_from([[], 7, "checkpoint", None]).map(lambda whole: ("", whole)),
    )
)
def test_a_malformed_task_checkpoint_is_ignored_not_a_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, change: tuple[str, Any]
) -> None:
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    spec = _spec(folder)
    key, value = change
    payload: Any = _genuine_payload(spec)
    if not key:
        payload = value
    elif value is ...:
        del payload[key]
    else:
        payload[key] = value
    torch.save(payload, checkpoint_path(spec))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dehbws"):
        assert load_training_state(spec) is None
    assert any(str(checkpoint_path(spec)) in r.getMessage() for r in caplog.records)
    shutil.rmtree(folder)

"""The Dockerfile and apptainer.def install dehbws from pyproject.toml and carry what runs offline.

Both recipes are parsed (Dockerfile instructions, definition-file header and sections, and the
shell commands inside them) rather than searched as text, so a comment that mentions a package
or a variable cannot make a check pass.
"""

import json
import posixpath
import re
import shlex
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
DATASET_PACKAGE = "dataset-fashion-mnist"
DATASET_DIR = "/usr/share/datasets/fashion-mnist"
# What the project build reads besides the package itself.
BUILD_INPUTS = ("pyproject.toml", "README.md", "dehbws")
SHELL_OPERATORS = {"&&", "||", ";", "|", "&", "(", ")"}
# pip options that take a value, so the value is not mistaken for a requirement.
PIP_VALUE_OPTIONS = {
    "-r", "--requirement", "-c", "--constraint", "-e", "--editable", "-f", "--find-links",
    "-i", "--index-url", "--extra-index-url", "-t", "--target", "--prefix", "--root",
    "--platform", "--python-version", "--implementation", "--abi", "--upgrade-strategy",
    "--progress-bar", "--cache-dir", "--src", "-C", "--config-settings", "--global-option",
    "--no-binary", "--only-binary", "--trusted-host", "--log", "--proxy", "--retries",
    "--timeout", "--exists-action", "--cert", "--client-cert", "--report",
}  # fmt: skip
# Python 3.11 images, or Debian 12 (bookworm), whose python3 is 3.11.
BASE_IMAGE_PATTERN = r"(docker\.io/(library/)?)?(python:3\.11[\w.-]*|debian:bookworm\S*)"
REQUIREMENT_FILE_OPTIONS = {"-r", "--requirement", "-c", "--constraint"}
INDEX_OPTIONS = {"-i", "--index-url", "--extra-index-url", "-f", "--find-links"}


@dataclass
class ShellCommand:
    """One simple command of a build step, with the folder it runs in."""

    argv: list[str]
    cwd: str


@dataclass
class Recipe:
    """What a container recipe does, in the terms these tests check."""

    name: str
    base_image: str = ""
    env: dict[str, str] = field(default_factory=dict)
    # Repository path -> absolute path in the image.
    copies: dict[str, str] = field(default_factory=dict)
    build_commands: list[ShellCommand] = field(default_factory=list)
    # The command that `docker run IMAGE ARGS` / `apptainer run IMAGE ARGS` starts.
    entry_command: list[str] = field(default_factory=list)


@dataclass
class PipInstall:
    """The arguments of one `pip install`, sorted by kind."""

    cwd: str
    paths: list[str] = field(default_factory=list)
    requirements: list[str] = field(default_factory=list)
    options: dict[str, list[str]] = field(default_factory=dict)


# Shell -------------------------------------------------------------------------------------


def logical_lines(text: str) -> Iterator[str]:
    """Join backslash-continued lines and drop blank and comment-only lines."""
    pending = ""
    for raw in text.splitlines():
        if not pending and raw.strip().startswith("#"):
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line, pending = pending + raw, ""
        if line.strip():
            yield line
    if pending.strip():
        yield pending


def split_commands(script: str, cwd: str) -> list[ShellCommand]:
    """Split shell text into simple commands at operators, dropping `VAR=value` prefixes."""
    commands = []
    for line in logical_lines(script):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current: list[str] = []
        for token in [*lexer, ";"]:
            if token not in SHELL_OPERATORS:
                current.append(token)
                continue
            while current and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", current[0]):
                current.pop(0)
            if current:
                commands.append(ShellCommand(argv=current, cwd=cwd))
            current = []
    return commands


def shell_exports(script: str) -> dict[str, str]:
    """The variables a shell snippet sets with `export NAME=value`."""
    env = {}
    for command in split_commands(script, cwd="/"):
        if command.argv[0] != "export":
            continue
        for assignment in command.argv[1:]:
            name, sep, value = assignment.partition("=")
            if sep:
                env[name] = value
    return env


# Dockerfile --------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    for line in logical_lines(text):
        keyword, _, arguments = line.strip().partition(" ")
        yield keyword.upper(), arguments.strip()


def docker_words(arguments: str) -> list[str]:
    """Arguments in exec (JSON array) form or shell-word form, as a list."""
    if arguments.startswith("["):
        words = json.loads(arguments)
        assert isinstance(words, list), arguments
        return [str(word) for word in words]
    return shlex.split(arguments)


def docker_env(arguments: str) -> dict[str, str]:
    """ENV in `NAME=value ...` form or the legacy `NAME value` form."""
    words = shlex.split(arguments)
    if "=" not in words[0]:
        return {words[0]: arguments.partition(" ")[2].strip()}
    return dict(word.split("=", 1) for word in words)


def docker_copy(arguments: str, workdir: str) -> dict[str, str]:
    """Where COPY/ADD puts each source, following Docker's rules for folders."""
    words = [word for word in docker_words(arguments) if not word.startswith("--")]
    *sources, dest = words
    dest_path = posixpath.normpath(posixpath.join(workdir, dest))
    into_folder = dest.endswith("/") or dest in (".", "./") or len(sources) > 1
    return {
        source: posixpath.join(dest_path, posixpath.basename(source.rstrip("/")))
        if into_folder
        else dest_path
        for source in sources
    }


def parse_dockerfile(path: Path) -> Recipe:
    """Read the parts of a Dockerfile these tests check."""
    recipe = Recipe(name=path.name)
    workdir = "/"
    for keyword, arguments in dockerfile_instructions(path.read_text()):
        if keyword == "FROM":
            recipe.base_image = next(w for w in arguments.split() if not w.startswith("--"))
        elif keyword == "ENV":
            recipe.env.update(docker_env(arguments))
        elif keyword == "WORKDIR":
            workdir = posixpath.normpath(posixpath.join(workdir, arguments))
        elif keyword in ("COPY", "ADD"):
            recipe.copies.update(docker_copy(arguments, workdir))
        elif keyword == "RUN" and arguments.startswith("["):
            recipe.build_commands.append(ShellCommand(docker_words(arguments), workdir))
        elif keyword == "RUN":
            recipe.build_commands.extend(split_commands(arguments, workdir))
        elif keyword == "ENTRYPOINT":
            recipe.entry_command = docker_words(arguments)
    return recipe


# Apptainer definition file -----------------------------------------------------------------


def definition_sections(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """Split a definition file into its header (keys lower-cased) and its %sections."""
    header: dict[str, str] = {}
    sections: dict[str, str] = {}
    current: str | None = None
    for line in text.splitlines():
        words = line.split()
        if words and words[0].startswith("%"):
            current = words[0][1:].lower()
            sections.setdefault(current, "")
        elif current is not None:
            sections[current] += line + "\n"
        elif words and not words[0].startswith("#"):
            key, _, value = line.split("#")[0].partition(":")
            header[key.strip().lower()] = value.strip()
    return header, sections


def parse_definition(path: Path) -> Recipe:
    """Read the parts of an Apptainer definition file these tests check."""
    header, sections = definition_sections(path.read_text())
    recipe = Recipe(name=path.name, base_image=header.get("from", ""))
    for line in logical_lines(sections.get("files", "")):
        source, *dest = shlex.split(line)
        recipe.copies[source] = dest[0] if dest else "/" + source
    recipe.env = shell_exports(sections.get("environment", ""))
    # %post runs from the root folder of the image being built.
    recipe.build_commands = split_commands(sections.get("post", ""), cwd="/")
    runscript = split_commands(sections.get("runscript", ""), cwd="/")
    if runscript:
        argv = runscript[-1].argv
        recipe.entry_command = argv[1:] if argv[0] == "exec" else argv
    return recipe


# pip ---------------------------------------------------------------------------------------


def pip_install_args(argv: list[str]) -> list[str] | None:
    """The arguments after `install` when argv is a pip install, else None."""
    if argv and posixpath.basename(argv[0]) in ("pip", "pip3", "pip3.11"):
        rest = argv[1:]
    elif len(argv) > 2 and argv[0].startswith("python") and argv[1:3] == ["-m", "pip"]:
        rest = argv[3:]
    else:
        return None
    return rest[1:] if rest[:1] == ["install"] else None


def parse_pip_install(args: list[str], cwd: str) -> PipInstall:
    """Sort pip install arguments into project paths, requirements and option values."""
    install = PipInstall(cwd=cwd)
    words = iter(args)
    for word in words:
        name, has_value, value = word.partition("=")
        if word.startswith("-"):
            if name in PIP_VALUE_OPTIONS:
                install.options.setdefault(name, []).append(value if has_value else next(words))
        elif word.startswith((".", "/")):
            install.paths.append(re.sub(r"\[.*\]$", "", word))
        else:
            install.requirements.append(word)
    return install


def pip_installs(recipe: Recipe) -> list[PipInstall]:
    """Every pip install in the recipe's build steps."""
    installs = []
    for command in recipe.build_commands:
        args = pip_install_args(command.argv)
        if args is not None:
            installs.append(parse_pip_install(args, command.cwd))
    return installs


def requirement_file_lines(name: str) -> list[str]:
    """Requirement lines of a -r/-c file, read from the repository."""
    lines = (REPO / name).read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def named_requirements(recipe: Recipe) -> list[str]:
    """Requirements the recipe names itself, on the command line or in -r/-c files."""
    named = []
    for install in pip_installs(recipe):
        named.extend(install.requirements)
        for option in REQUIREMENT_FILE_OPTIONS:
            for name in install.options.get(option, []):
                named.extend(requirement_file_lines(name))
    return named


# Fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pyproject() -> dict:
    """pyproject.toml, the only place dependency versions are written down."""
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def pyproject_pins(pyproject: dict) -> dict[str, Requirement]:
    """pyproject's [project] dependencies by canonical package name."""
    requirements = [Requirement(spec) for spec in pyproject["project"]["dependencies"]]
    return {canonicalize_name(requirement.name): requirement for requirement in requirements}


@pytest.fixture(params=["Dockerfile", "apptainer.def"])
def recipe(request: pytest.FixtureRequest) -> Recipe:
    """Each container recipe, parsed."""
    path = REPO / request.param
    return parse_dockerfile(path) if path.name == "Dockerfile" else parse_definition(path)


# Tests -------------------------------------------------------------------------------------


def test_installs_the_project_with_pip(recipe: Recipe) -> None:
    project_dir = posixpath.dirname(recipe.copies.get("pyproject.toml", "/"))
    targets = [
        posixpath.normpath(posixpath.join(install.cwd, path))
        for install in pip_installs(recipe)
        for path in install.paths
    ]

    assert "pyproject.toml" in recipe.copies, f"{recipe.name} does not copy pyproject.toml"
    assert project_dir in targets, (
        f"{recipe.name} never runs pip install on {project_dir} (pip installs {targets})"
    )


def test_copies_every_build_input_beside_pyproject(recipe: Recipe) -> None:
    project_dir = posixpath.dirname(recipe.copies.get("pyproject.toml", "/"))

    for source in BUILD_INPUTS:
        assert recipe.copies.get(source) == posixpath.join(project_dir, source), (
            f"{recipe.name} does not copy {source} to {project_dir}"
        )


def test_copied_sources_exist(recipe: Recipe) -> None:
    missing = [source for source in recipe.copies if not (REPO / source).exists()]

    assert not missing, f"{recipe.name} copies {missing}, missing from the repository"


def test_named_versions_equal_pyproject(
    recipe: Recipe, pyproject_pins: dict[str, Requirement]
) -> None:
    for text in named_requirements(recipe):
        try:
            named = Requirement(text)
        except InvalidRequirement:
            pytest.fail(f"{recipe.name} installs {text!r}, which is not a requirement")
        if not named.specifier:
            continue
        pinned = pyproject_pins.get(canonicalize_name(named.name))
        assert pinned is not None, (
            f"{recipe.name} pins {text!r}, a package that pyproject.toml does not depend on"
        )
        assert named.specifier == pinned.specifier, (
            f"{recipe.name} pins {text!r}, but pyproject.toml says {str(pinned)!r}"
        )


def test_does_not_ask_for_cpu_only_torch(recipe: Recipe) -> None:
    indexes = [
        url
        for install in pip_installs(recipe)
        for option in INDEX_OPTIONS
        for url in install.options.get(option, [])
    ]

    assert not [url for url in indexes if "/cpu" in url], (
        f"{recipe.name} installs from a CPU-only index: {indexes}"
    )


def test_carries_fashion_mnist(recipe: Recipe) -> None:
    apt_installs = [
        command.argv
        for command in recipe.build_commands
        if posixpath.basename(command.argv[0]) in ("apt-get", "apt") and "install" in command.argv
    ]

    assert any(DATASET_PACKAGE in argv for argv in apt_installs), (
        f"{recipe.name} does not apt-get install {DATASET_PACKAGE} (apt installs {apt_installs})"
    )
    assert recipe.env.get("DEHBWS_DATA_DIR", DATASET_DIR) == DATASET_DIR


def test_entry_point_is_dehbws(recipe: Recipe, pyproject: dict) -> None:
    assert "dehbws" in pyproject["project"]["scripts"]
    # "$@" in a runscript passes the arguments through, as docker run does for ENTRYPOINT.
    assert recipe.entry_command in (["dehbws"], ["dehbws", "$@"]), (
        f"{recipe.name} starts {recipe.entry_command}, not dehbws"
    )


def test_turns_hdf5_file_locking_off(recipe: Recipe) -> None:
    assert recipe.env.get("HDF5_USE_FILE_LOCKING") == "FALSE", (
        f"{recipe.name} sets HDF5_USE_FILE_LOCKING to {recipe.env.get('HDF5_USE_FILE_LOCKING')!r}"
    )


def test_base_image_has_python_3_11(recipe: Recipe, pyproject: dict) -> None:
    assert pyproject["project"]["requires-python"] == ">=3.11,<3.12"
    assert re.fullmatch(BASE_IMAGE_PATTERN, recipe.base_image), (
        f"{recipe.name} starts from {recipe.base_image!r}"
    )


def test_both_recipes_start_from_the_same_base() -> None:
    docker = parse_dockerfile(REPO / "Dockerfile")
    apptainer = parse_definition(REPO / "apptainer.def")

    assert docker.base_image == apptainer.base_image


# The parsers themselves --------------------------------------------------------------------


def test_split_commands_handles_operators_and_prefixes() -> None:
    script = "apt-get update \\\n && DEBIAN_FRONTEND=noninteractive apt-get install -y x; ls"

    argvs = [command.argv for command in split_commands(script, cwd="/")]

    assert argvs == [["apt-get", "update"], ["apt-get", "install", "-y", "x"], ["ls"]]


def test_parse_pip_install_sorts_arguments() -> None:
    args = shlex.split("--no-cache-dir -c reqs.lock --index-url=https://x/cpu .[test] h5py>=3")

    install = parse_pip_install(args, cwd="/src")

    assert install.paths == ["."]
    assert install.requirements == ["h5py>=3"]
    assert install.options == {"-c": ["reqs.lock"], "--index-url": ["https://x/cpu"]}


def test_docker_copy_follows_folder_rules() -> None:
    assert docker_copy("a.toml b.md ./", "/src") == {"a.toml": "/src/a.toml", "b.md": "/src/b.md"}
    assert docker_copy("--chown=1:1 pkg ./pkg", "/src") == {"pkg": "/src/pkg"}
    assert docker_copy('["x", "/y"]', "/") == {"x": "/y"}

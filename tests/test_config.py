"""Config loading: defaults, YAML file, typed ``--set`` overrides, and the errors for bad input."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

import imdb_dist.config
from imdb_dist.config import (
    OFFICIAL_SHA256,
    OFFICIAL_URL,
    Config,
    DataConfig,
    DistributionConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    dump_yaml,
    load_config,
    to_dict,
)
from imdb_dist.errors import ConfigError, InputError

PRESETS = sorted((Path(__file__).resolve().parents[1] / "job" / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_config_error_is_an_input_error():
    # The CLI maps InputError to "error: ..." and exit 2; config mistakes must take that path.
    assert issubclass(ConfigError, InputError)


def test_defaults_load_with_no_file():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.data.source == "auto"
    assert cfg.data.path is None
    assert cfg.data.url == OFFICIAL_URL
    assert cfg.data.sha256 == OFFICIAL_SHA256
    assert cfg.train.epochs == 2
    assert cfg.train.learning_rate == 0.001
    assert cfg.distribution.devices == ()
    assert cfg.run.output_dir == "runs/default"


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_empty_file_gives_defaults(tmp_path, text):
    assert load_config(write(tmp_path, text)) == Config()


def test_yaml_file_is_read(tmp_path):
    path = write(
        tmp_path,
        """
data:
  source: aclimdb
  path: /data/aclImdb.tar.gz
  max_len: 200
  bucketing: false
model:
  dropout: 0.5
train:
  epochs: 5
  learning_rate: 0.002
  mixed_precision: mixed_bfloat16
distribution:
  strategy: mirrored
  devices: [/gpu:0, /gpu:1]
run:
  output_dir: runs/yaml
""",
    )
    cfg = load_config(path)
    assert cfg.data == dataclasses.replace(
        DataConfig(), source="aclimdb", path="/data/aclImdb.tar.gz", max_len=200, bucketing=False
    )
    assert cfg.model == ModelConfig(dropout=0.5)
    assert cfg.train == TrainConfig(epochs=5, learning_rate=0.002, mixed_precision="mixed_bfloat16")
    assert cfg.distribution == DistributionConfig(strategy="mirrored", devices=("/gpu:0", "/gpu:1"))
    assert cfg.run == RunConfig(output_dir="runs/yaml")


@pytest.mark.parametrize(
    ("override", "section", "field", "expected"),
    [
        ("train.epochs=3", "train", "epochs", 3),
        ("train.learning_rate=0.02", "train", "learning_rate", 0.02),
        ("train.learning_rate=1", "train", "learning_rate", 1.0),  # int accepted for a float
        ("data.bucketing=false", "data", "bucketing", False),
        ("data.bucketing=true", "data", "bucketing", True),
        ("run.output_dir=runs/x", "run", "output_dir", "runs/x"),
        ("run.output_dir=a=b", "run", "output_dir", "a=b"),  # only the first '=' splits
        ("data.path=/data/aclImdb", "data", "path", "/data/aclImdb"),
        ("data.path=null", "data", "path", None),
        ("distribution.devices=[/gpu:0,/gpu:1]", "distribution", "devices", ("/gpu:0", "/gpu:1")),
        ("distribution.devices=[]", "distribution", "devices", ()),
        ("distribution.strategy=multi_worker", "distribution", "strategy", "multi_worker"),
        ("train.mixed_precision=mixed_float16", "train", "mixed_precision", "mixed_float16"),
        ("train.lr_schedule=cosine", "train", "lr_schedule", "cosine"),
        ("data.source=keras", "data", "source", "keras"),
        ("data.source=download", "data", "source", "download"),
        ("data.url=https://mirror.example/d/aclImdb_v1.tar.gz", "data", "url", "https://mirror.example/d/aclImdb_v1.tar.gz"),
        ("data.url=file:///srv/aclImdb_v1.tar.gz", "data", "url", "file:///srv/aclImdb_v1.tar.gz"),
        ("data.sha256=" + "AB" * 32, "data", "sha256", "AB" * 32),  # sha256 tools print either case
        (" train.epochs = 4 ", "train", "epochs", 4),
    ],
)
def test_override_is_typed_by_the_schema(override, section, field, expected):
    value = getattr(getattr(load_config(None, [override]), section), field)
    assert value == expected
    assert type(value) is type(expected)


def test_precedence_override_over_file_over_default(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 5\n  batch_size: 32\ndata:\n  path: /from/file\n")
    cfg = load_config(path, ["train.epochs=7", "data.path=null"])
    assert cfg.train.epochs == 7  # override beats file
    assert cfg.data.path is None  # override to null beats file
    assert cfg.train.batch_size == 32  # file beats default
    assert cfg.train.learning_rate == TrainConfig().learning_rate  # default remains


def test_later_override_wins():
    assert load_config(None, ["train.epochs=3", "train.epochs=4"]).train.epochs == 4


@pytest.mark.parametrize(
    ("text", "overrides", "key"),
    [
        ("trian:\n  epochs: 1\n", [], "trian"),
        ("data:\n  max_lenn: 300\n", [], "data.max_lenn"),
        ("", ["data.max_lenn=300"], "data.max_lenn"),
        ("", ["optimizer.lr=0.1"], "optimizer"),
        ("", ["epochs=3"], "epochs"),
    ],
)
def test_unknown_key_is_named(tmp_path, text, overrides, key):
    with pytest.raises(ConfigError, match=rf"config key {key}: unknown key") as info:
        load_config(write(tmp_path, text), overrides)
    assert info.value.key == key


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('train:\n  epochs: "two"\n', "train.epochs"),
        ("train:\n  epochs: true\n", "train.epochs"),  # bool is an int subclass; still refused
        ("train:\n  epochs: 2.0\n", "train.epochs"),
        ("train:\n  mixed_precision: 16\n", "train.mixed_precision"),
        ("train:\n  mixed_precision: float64\n", "train.mixed_precision"),
        ("train:\n  lr_schedule: linear\n", "train.lr_schedule"),
        ("train:\n  learning_rate: fast\n", "train.learning_rate"),
        ("train:\n  learning_rate: true\n", "train.learning_rate"),
        ("data:\n  bucketing: 1\n", "data.bucketing"),
        ("data:\n  source: s3\n", "data.source"),
        ("data:\n  path: [a, b]\n", "data.path"),
        ("distribution:\n  devices: /gpu:0\n", "distribution.devices"),
        ("distribution:\n  devices: [/gpu:0, 1]\n", r"distribution.devices\[1\]"),
        ("run:\n  output_dir: 5\n", "run.output_dir"),
        ("train: 3\n", "train"),
    ],
)
def test_wrong_type_is_refused(tmp_path, text, key):
    with pytest.raises(ConfigError, match=rf"config key {key}:"):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.max_len=0", "data.max_len"),
        ("data.vocab_size=-1", "data.vocab_size"),
        ("train.batch_size=0", "train.batch_size"),
        ("data.validation_fraction=0.9", "data.validation_fraction"),
        ("data.validation_fraction=0", "data.validation_fraction"),
        ("model.dropout=1.0", "model.dropout"),
        ("model.dropout=-0.1", "model.dropout"),
        ("train.learning_rate=0", "train.learning_rate"),
        ("train.epochs=0", "train.epochs"),
        ("train.steps_per_execution=0", "train.steps_per_execution"),
        ("model.lstm_units=0", "model.lstm_units"),
        ("model.members=0", "model.members"),
        ("model.members=65", "model.members"),
        ("run.checkpoint_steps=-1", "run.checkpoint_steps"),
        ("run.output_dir=' '", "run.output_dir"),
        ("data.folds=1", "data.folds"),
        ("data.folds=-5", "data.folds"),
        ("data.fold=1", "data.fold"),  # a fold without folds
        ("data.sha256=" + "a" * 63, "data.sha256"),
        ("data.sha256=" + "a" * 65, "data.sha256"),
        ("data.sha256=" + "g" * 64, "data.sha256"),
        ("data.sha256=", "data.sha256"),
        ("data.url=ftp://host/aclImdb_v1.tar.gz", "data.url"),
        ("data.url=ai.stanford.edu/aclImdb_v1.tar.gz", "data.url"),
        ("data.url=/data/aclImdb_v1.tar.gz", "data.url"),
        ("data.url=https://host/", "data.url"),  # no file name to cache it under
        ("data.url=https://host/a/..", "data.url"),
    ],
)
def test_impossible_value_is_refused(override, key):
    with pytest.raises(ConfigError, match=rf"config key {key}:"):
        load_config(None, [override])


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.members=64"],
        ["data.validation_fraction=0.5"],
        ["model.dropout=0.0"],
        ["data.max_len=8", "model.kernel_size=3", "model.pool_size=2"],
        ["train.early_stopping_patience=0", "run.checkpoint_steps=0"],
        ["data.folds=2", "data.fold=1"],
        ["data.folds=100", "data.fold=0"],
    ],
)
def test_range_edges_are_accepted(overrides):
    load_config(None, overrides)


def test_max_len_must_cover_first_conv_and_pool_window():
    with pytest.raises(ConfigError, match=r"config key data\.max_len: 12 is shorter .*\(13\)"):
        load_config(None, ["data.max_len=12", "model.kernel_size=10", "model.pool_size=4"])
    assert load_config(None, ["data.max_len=13", "model.kernel_size=10", "model.pool_size=4"]).data.max_len == 13


def test_yaml_syntax_error_names_the_file(tmp_path):
    path = write(tmp_path, "data:\n  max_len: [1, 2\ntrain:\n  epochs: 1\n", name="broken.yaml")
    with pytest.raises(ConfigError, match=rf"invalid YAML in {re.escape(str(path))} \(line \d+\)"):
        load_config(path)


def test_yaml_python_tag_is_refused_and_not_executed(tmp_path, capfd):
    marker = tmp_path / "executed"
    path = write(tmp_path, f'x: !!python/object/apply:os.system ["echo hi > {marker}; echo hi"]\n', name="evil.yaml")
    with pytest.raises(ConfigError, match=rf"invalid YAML in {re.escape(str(path))}"):
        load_config(path)
    assert not marker.exists()
    assert "hi" not in capfd.readouterr().out


def test_top_level_list_is_refused(tmp_path):
    path = write(tmp_path, "- train\n- data\n", name="list.yaml")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))} must hold a mapping at the top level, not list"):
        load_config(path)


@pytest.mark.parametrize("override", ["train.epochs", "=3", " =3", ""])
def test_override_without_key_and_equals_is_refused(override):
    with pytest.raises(ConfigError, match="is not of the form key.path=value"):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("", ["train.epochs.x=1"], "expected int"),
        ("", ["train.epochs=3", "train.epochs.x=1"], "is not a section"),
        ("train:\n  epochs: 3\n", ["train.epochs.x=1"], "is not a section"),
    ],
)
def test_override_into_a_scalar_is_refused(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=rf"config key train\.epochs: .*{message}"):
        load_config(write(tmp_path, text), overrides)


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"cannot read config file {re.escape(str(path))}"):
        load_config(path)


def test_config_path_that_is_a_directory(tmp_path):
    with pytest.raises(ConfigError, match=rf"cannot read config file {re.escape(str(tmp_path))}"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    "config",
    [
        Config(),
        Config(
            data=DataConfig(source="aclimdb", path="/d/aclImdb.tar.gz", validation_fraction=0.25, bucketing=False),
            model=ModelConfig(dropout=0.0, kernel_size=3),
            train=TrainConfig(epochs=9, learning_rate=1e-5, mixed_precision="mixed_float16"),
            distribution=DistributionConfig(strategy="mirrored", devices=("/gpu:0", "/gpu:1")),
            run=RunConfig(output_dir="runs/round trip", checkpoint_steps=100),
        ),
    ],
    ids=["defaults", "custom"],
)
def test_dump_yaml_round_trips(tmp_path, config):
    path = write(tmp_path, dump_yaml(config), name="resolved.yaml")
    assert load_config(path) == config


def test_presets_exist():
    assert PRESETS, "job/configs/*.yaml holds no presets"


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_preset_loads_with_its_values(preset):
    cfg = load_config(preset, ["data.path=/data/aclImdb_train.tar.gz"])
    raw = yaml.safe_load(preset.read_text(encoding="utf-8"))
    raw.get("data", {}).pop("path", None)  # the override above wins
    for section, values in raw.items():
        for field, value in values.items():
            expected = tuple(value) if isinstance(value, list) else value  # a YAML list loads as a tuple
            assert getattr(getattr(cfg, section), field) == expected, f"{section}.{field}"


@pytest.mark.parametrize("key", ["train.learning_rate", "data.validation_fraction", "model.dropout"])
def test_nan_is_refused(key):
    with pytest.raises(ConfigError, match=rf"config key {key}:"):
        load_config(None, [f"{key}=.nan"])


@pytest.mark.parametrize("text", ["1e-3", "5E-4"])
def test_scientific_notation_is_a_float(text):
    assert load_config(None, [f"train.learning_rate={text}"]).train.learning_rate == float(text)


def test_unknown_keys_of_mixed_types_raise_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"config key data\.\S+: unknown key"):
        load_config(write(tmp_path, "data:\n  1: x\n  max_lenn: 3\n"))


@pytest.mark.parametrize(("folds", "fold"), [(5, 5), (5, -1), (2, 7)])
def test_fold_outside_the_folds_is_refused(folds, fold):
    with pytest.raises(ConfigError, match=r"config key data.fold: .* out of range"):
        load_config(None, [f"data.folds={folds}", f"data.fold={fold}"])


# What a CPU rehearsal of ray-gpu.yaml may change, and nothing else: the
# model, the data and the global batch (so every step's data) stay the GPU job's.
REHEARSAL_CHANGES = {
    "data.source", "data.path",
    "train.epochs", "train.mixed_precision",
    "distribution.cpu_devices", "run.checkpoint_steps",
    "ray.use_gpu", "ray.resources_per_worker", "ray.storage_path", "ray.name", "ray.max_failures",
    "ray.gpu_wait_s",  # the rehearsal asks for no GPUs
}


def test_the_gpu_rehearsal_is_the_gpu_config_on_cpus():
    configs = Path(__file__).resolve().parents[1] / "job" / "configs"
    gpu, rehearsal = (to_dict(load_config(configs / name)) for name in ("ray-gpu.yaml", "ray-gpu-rehearsal.yaml"))
    differ = {
        f"{section}.{key}"
        for section in gpu
        for key in gpu[section]
        if gpu[section][key] != rehearsal[section][key]
    }
    assert differ <= REHEARSAL_CHANGES, sorted(differ - REHEARSAL_CHANGES)
    assert rehearsal["distribution"]["cpu_devices"] >= 2 and rehearsal["ray"]["num_workers"] >= 2
    assert rehearsal["train"]["batch_size"] == gpu["train"]["batch_size"]


def test_cpu_devices_is_off_or_a_split_into_two_or_more():
    assert load_config(None, ["distribution.cpu_devices=2"]).distribution.cpu_devices == 2
    with pytest.raises(ConfigError, match="config key distribution.cpu_devices: 1 is no split"):
        load_config(None, ["distribution.cpu_devices=1"])
    with pytest.raises(ConfigError, match="config key distribution.cpu_devices: .*not default"):
        load_config(None, ["distribution.cpu_devices=2", "distribution.strategy=default"])
    with pytest.raises(ConfigError, match="config key distribution.cpu_devices: .*set one"):
        load_config(None, ["distribution.cpu_devices=2", "distribution.devices=[/cpu:0]"])


def test_a_bfloat16_transport_needs_the_dense_route_and_a_known_dtype():
    assert load_config(None, ["distribution.embedding_transport=bfloat16"]).distribution.embedding_transport == "bfloat16"
    with pytest.raises(ConfigError, match="config key distribution.embedding_transport: bfloat16 .* sparse"):
        load_config(None, ["distribution.embedding_transport=bfloat16", "distribution.embedding_gradient=sparse"])
    with pytest.raises(ConfigError, match="distribution.embedding_transport"):
        load_config(None, ["distribution.embedding_transport=float16"])


def test_num_workers_is_a_count_or_an_elastic_range_and_round_trips_through_yaml(tmp_path):
    elastic = load_config(None, ["ray.num_workers=[1, 4]"])
    assert elastic.ray.num_workers == (1, 4) and elastic.ray.elastic and list(elastic.ray.worker_counts) == [1, 2, 3, 4]
    fixed = load_config(None, ["ray.num_workers=3"])
    assert fixed.ray.num_workers == 3 and not fixed.ray.elastic and list(fixed.ray.worker_counts) == [3]
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_yaml(elastic))
    assert load_config(saved) == elastic


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[3, 1]", r"ray\.num_workers\[1\]: 1 is out of range \[3, "),
        ("[0, 2]", r"ray\.num_workers\[0\]: 0 is out of range \[1, "),
        ("[1, 2, 3]", r"ray\.num_workers: expected int or \[int, int\], got list \[1, 2, 3\]"),
        ("true", r"ray\.num_workers: expected int or \[int, int\], got bool True"),
        ("two", r"ray\.num_workers: expected int or \[int, int\], got str 'two'"),
    ],
)
def test_a_bad_num_workers_is_refused_naming_the_key(value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"ray.num_workers={value}"])


@pytest.mark.parametrize("value", ["0", "0.01", "61"])
def test_a_report_poll_outside_what_ray_train_can_keep_up_with_is_refused(value):
    # Under 0.05 s the controller would do little but poll; over a minute, failures and
    # preemption notices would wait that long to be noticed.
    with pytest.raises(ConfigError, match=rf"ray\.report_poll_s: {float(value)} is out of range \[0\.05, 60\.0\]"):
        load_config(None, [f"ray.report_poll_s={value}"])


def _package_imports(path: Path) -> list[tuple[str, bool]]:
    """Each ``imdb_dist`` module that ``path`` imports, and whether at its top level (not inside a function)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        found += [(name, id(node) not in inner) for name in names if name.split(".")[0] == "imdb_dist"]
    return found


def test_the_config_stays_at_the_bottom_layer():
    # It imports only the errors, its own modules, and storage on first use (to refuse credentials in
    # a URI): nothing of the job it configures, so every module can import it.
    package = Path(imdb_dist.config.__file__).parent
    modules = sorted(package.glob("*.py"))
    assert {p.name for p in modules} >= {"__init__.py", "job.py", "cluster.py", "loading.py", "reference.py"}
    wrong = [
        f"{path.name} imports {name}{' at its top' if top else ''}"
        for path in modules
        for name, top in _package_imports(path)
        if not (name == "imdb_dist.errors" or name.startswith("imdb_dist.config.") or (name == "imdb_dist.storage" and not top))
    ]
    assert wrong == []


def test_the_config_keeps_its_public_names():
    # Every module imports these from imdb_dist.config, whichever of its modules holds them.
    for name in ("Config", "DataConfig", "ModelConfig", "TrainConfig", "DistributionConfig", "RunConfig", "RayConfig",
                 "TuneConfig", "load_config", "with_values", "config_from_dict", "to_dict", "dump_yaml",
                 "OFFICIAL_URL", "OFFICIAL_SHA256", "METRIC_MODES"):
        assert name in imdb_dist.config.__all__ and hasattr(imdb_dist.config, name), name

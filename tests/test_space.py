import json
import subprocess
import sys

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from psearch.engine import space
from psearch.engine.errors import UsageError
from psearch.engine.space import Entry

optuna.logging.set_verbosity(optuna.logging.WARNING)

EXAMPLE = """\
model_type: {type: categorical, choices: [convnext, vit, small]}
lr:                                   # a list: the first entry whose `when` holds is used
  - {type: float, low: 3.0e-4, high: 3.0e-3, log: true, when: {model_type: small}}
  - {type: float, low: 1.0e-5, high: 5.0e-4, log: true}
weight_decay: {type: float, low: 1e-6, high: 1.0e-1, log: true}
warmup_epochs: {type: int, low: 0, high: 5, step: 1}
freeze: {type: int, low: 0, high: 2, when: {model_type: [convnext, vit]}}
loss: {type: categorical, choices: [ce, focal]}
smoothing: [{value: 0, when: {loss: focal}}, {type: float, low: 0.0, high: 0.2, step: 0.05}]
embedding_dim: 256
"""


def write(tmp_path, text, name="space.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def example(tmp_path):
    return space.load(write(tmp_path, EXAMPLE))


def study():
    return optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))


# --- reading and checking a file ---------------------------------------------------------------

def test_example_loads_in_file_order_with_explicit_canonical_data(example):
    assert example.names == ("model_type", "lr", "weight_decay", "warmup_epochs", "freeze",
                             "loss", "smoothing", "embedding_dim")
    data = example.to_data()
    assert data["lr"][0] == {"type": "float", "low": 3e-4, "high": 3e-3, "log": True,
                             "step": None, "when": {"model_type": ["small"]}}
    assert data["weight_decay"][0]["low"] == 1e-6  # PyYAML's string '1e-6' read as a number
    assert data["warmup_epochs"] == [{"type": "int", "low": 0, "high": 5, "log": False,
                                      "step": 1, "when": {}}]
    assert data["embedding_dim"] == [{"value": 256, "when": {}}]
    assert json.loads(json.dumps(data)) == data


BAD = [
    ("lr: {type: float, low: 1\n", "malformed YAML at line 2"),
    ("- lr\n", "holds a list, not a mapping"),
    ("", "holds nothing"),
    ("lr: {type: float, low: 0.1, high: 1, lgo: true}", "lr: unknown key 'lgo'"),
    ("lr: {value: 1, type: float}", "lr: unknown key 'type'"),
    ("lr: {type: double, low: 0, high: 1}", "lr: type 'double' is not one of float"),
    ("lr: {low: 0, high: 1}", "lr: has no type"),
    ("lr: {type: float, high: 1}", "lr: low is missing"),
    ("lr: {type: float, low: 0.1, high: 0.01}", "lr: low 0.1 is not below high 0.01; make low"),
    ("lr: {type: float, low: abc, high: 1}", "lr: low 'abc' is not a number"),
    ("lr: {type: float, low: 0.0, high: 1, log: true}", "lr: log: true needs low above 0"),
    ("n: {type: int, low: 0, high: 8, log: true}", "n: log: true needs low at least 1"),
    ("lr: {type: float, low: 0.1, high: 1, log: yes please}", "lr: log 'yes please' is not"),
    ("lr: {type: float, low: 0.1, high: 1.1, log: true, step: 0.5}", "lr: log: true cannot go"),
    ("n: {type: int, low: 1, high: 9, log: true, step: 2}", "n: log: true cannot go with step"),
    ("lr: {type: float, low: 0, high: 1, step: -0.5}", "lr: step -0.5 is not above 0"),
    ("n: {type: int, low: 0, high: 4, step: 0}", "n: step 0 is not above 0"),
    ("n: {type: int, low: 0.5, high: 4}", "n: low 0.5 is not a whole number"),
    ("n: {type: int, low: true, high: 4}", "n: low True is not a whole number"),
    ("n: {type: int, low: 0, high: 5, step: 2}", "n: step 2 does not divide high - low = 5"),
    ("x: {type: float, low: 0, high: 1, step: 0.3}", "x: step 0.3 does not divide"),
    ("c: {type: categorical, choices: []}", "c: choices [] is not a non-empty list"),
    ("c: {type: categorical, choices: a}", "c: choices 'a' is not a non-empty list"),
    ("c: {type: categorical, choices: [a, [b]]}", "c: choice ['b'] is not a number"),
    ("c: {type: categorical, choices: [a, b, a]}", "c: choices repeat 'a'"),
    ("m: vit\nlr: {type: float, low: 0.1, high: 1, when: vit}", "lr: when 'vit' is not a mapping"),
    ("lr: {type: float, low: 0.1, high: 1, when: {m: vit}}\nm: vit",
     "lr: when names 'm', which is not a parameter defined above"),
    ("m: vit\nlr: {type: float, low: 0.1, high: 1, when: {m: {a: 1}}}",
     "lr: when m: {'a': 1} is not a value or a list of values"),
    ("m: vit\nlr: {type: float, low: 0.1, high: 1, when: {m: []}}", "lr: when m: [] is not"),
    ("m: vit\nlr: [{type: float, low: 0.1, high: 1, when: {m: vit}}, 3]",
     "lr entry 2: 3 is not a mapping"),
    ("lr: []", "lr: is an empty list"),
    ("lr: [0.1, 0.2]", "lr: is a plain list [0.1, 0.2]; to search these values write "
                       "{type: categorical, choices: [0.1, 0.2]}"),
    ("lr:\n", "lr: has no value"),
    ("lr: 2024-01-01", "lr: datetime.date(2024, 1, 1) is not a number"),
    ("my-lr: 1", "parameter name 'my-lr' is not a name"),
    ("3: 1", "parameter name 3 is not a name"),
    ("lr: [{type: float, low: 0.1, high: 1}, {type: float, low: 0.2, high: 1}]",
     "lr entry 2: is never used, since entry 1 has no `when`"),
    ("m: vit\nlr: [{type: float, low: 0.1, high: 1, when: {m: vit}}, {type: categorical, "
     "choices: [a]}]", "lr: entry 2 does not fit entry 1 (Cannot set different distribution"),
    ("m: vit\nlr: [{type: float, low: 0.1, high: 1, log: true, when: {m: vit}}, {type: float, "
     "low: 0.1, high: 1}]", "lr: entry 2 does not fit entry 1 (Cannot set different log"),
    ("m: vit\nc: [{type: categorical, choices: [a, b], when: {m: vit}}, {type: categorical, "
     "choices: [a]}]", "c: entry 2 does not fit entry 1 (CategoricalDistribution does not"),
    ("m: vit\nc: [{value: a, when: {m: vit}}, {value: b}]", "c: entry 2 does not fit entry 1"),
    ("m: vit\nx: [{value: off, when: {m: vit}}, {type: float, low: 0, high: 1}]",
     "x: entry 2 does not fit entry 1"),
]


@pytest.mark.parametrize("text, problem", BAD)
def test_a_bad_file_is_refused_in_one_line_naming_the_file_parameter_and_problem(
        tmp_path, text, problem):
    with pytest.raises(UsageError) as caught:
        space.load(write(tmp_path, text))
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'space.yaml'}: ") and "\n" not in message
    assert problem in message


def test_unreadable_file_names_the_path(tmp_path):
    with pytest.raises(UsageError, match="missing.yaml: cannot be read"):
        space.load(tmp_path / "missing.yaml")


def test_known_names_refuse_a_stranger_and_list_the_known_ones_sorted(tmp_path):
    path = write(tmp_path, "lr: 0.1\nbatch: 32\n")
    assert space.load(path, known={"lr", "batch", "epochs"}).names == ("lr", "batch")
    with pytest.raises(UsageError, match=r": unknown parameter 'batch'; the objective accepts "
                                         r"epochs, lr$"):
        space.load(path, known=["lr", "epochs"])


def test_implicit_names_may_be_used_in_conditions(tmp_path):
    path = write(tmp_path, "lr: {type: float, low: 0.1, high: 1, when: {model_type: vit}}\n")
    with pytest.raises(UsageError, match="when names 'model_type'"):
        space.load(path)
    loaded = space.load(path, implicit={"model_type"})
    assert loaded.to_data()["lr"][0]["when"] == {"model_type": ["vit"]}


def test_dotless_exponents_are_numbers_everywhere_a_number_is_meant(tmp_path):
    loaded = space.load(write(tmp_path, "a: 1e-4\nb: {type: categorical, choices: [1e-3, 5e-3]}\n"
                                        "c: {type: float, low: 1e-5, high: '2E-3'}\nd: 'x1e-4'\n"))
    data = loaded.to_data()
    assert data["a"][0]["value"] == 1e-4 and data["b"][0]["choices"] == [1e-3, 5e-3]
    assert (data["c"][0]["low"], data["c"][0]["high"]) == (1e-5, 2e-3)
    assert data["d"][0]["value"] == "x1e-4"


def test_importing_the_space_loads_neither_torch_nor_the_built_in_objective():
    code = ("import sys, psearch.engine.space; "
            "print([m for m in sys.modules if m.startswith(('torch', 'psearch.writer_id'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- canonical data and YAML -------------------------------------------------------------------

def test_files_that_mean_the_same_thing_give_equal_data(tmp_path):
    one = space.load(write(tmp_path, """\
m: {type: categorical, choices: [a, b]}
k: {type: categorical, choices: [x, y]}
lr: {type: float, low: 1.0e-5, high: 1, when: {m: a, k: [y, x, y]}}
n: {type: int, low: 0, high: 4}
fixed: 3
""", "one.yaml"))
    two = space.load(write(tmp_path, """\
m: {when: null, choices: [a, b], type: categorical}
k: [{type: categorical, choices: [x, y]}]
lr: [{when: {k: [x, y], m: [a]}, type: float, low: 1e-5, high: 1.0, log: false}]
n: {type: int, low: 0, high: 4, step: 1, log: false}
fixed: {value: 3}
""", "two.yaml"))
    assert one.to_data() == two.to_data() and one.params == two.params


def test_to_data_round_trips_through_json(example):
    data = json.loads(json.dumps(example.to_data()))
    assert space.from_data(data, "stored") == space.Space(example.params, "stored")


def test_to_yaml_loads_back_to_an_equal_space(tmp_path, example):
    text = example.to_yaml()
    assert "embedding_dim: 256\n" in text and "#" not in text
    assert "warmup_epochs: {type: int, low: 0, high: 5}\n" in text
    assert "lr:\n  - {type: float" in text  # too long for one line: one entry per line
    again = space.load(write(tmp_path, text, "space.yaml"))
    assert again.params == example.params


def test_to_yaml_quotes_what_would_otherwise_load_as_something_else(tmp_path):
    original = space.parse({"flag": "true", "name": "1e-4x", "on_off": True,
                            "c": {"type": "categorical", "choices": ["null", 1, "2"]}}, "s.yaml")
    again = space.load(write(tmp_path, original.to_yaml(), "s.yaml"))
    assert again.params == original.params


def test_with_first_puts_a_parameter_first_so_conditions_can_use_it(tmp_path):
    path = write(tmp_path, "lr: [{type: float, low: 0.1, high: 1, when: {model_type: vit}}, "
                           "{value: 0.5}]\n")
    loaded = space.load(path, implicit={"model_type"})
    models = Entry(CategoricalDistribution(["vit", "small"]))
    full = loaded.with_first("model_type", models)
    assert full.names == ("model_type", "lr") and full.source == str(path)
    assert full == loaded.with_first("model_type", {"type": "categorical",
                                                    "choices": ["vit", "small"]})
    assert loaded.with_first("model_type", "vit").to_data()["model_type"] == [
        {"value": "vit", "when": {}}]
    with pytest.raises(ValueError, match="'lr' is already in"):
        loaded.with_first("lr", 0.1)


def test_without_drops_a_parameter_and_conditions_on_it_no_longer_hold(example):
    smaller = example.without("loss")
    assert "loss" not in smaller.names and example.without("nothing") == example
    trial = study().ask()
    smaller.suggest(trial)
    assert trial.distributions["smoothing"] == FloatDistribution(0.0, 0.2, step=0.05)


def test_given_loads_the_space_a_worker_was_started_with(tmp_path, example):
    path = write(tmp_path, EXAMPLE)
    assert space.given({space.SPACE_VAR: str(path)}) == example
    assert space.given({}) is None


# --- suggesting on a real study ----------------------------------------------------------------

def test_suggest_follows_conditions_in_file_order_and_records_fixed_values(example):
    s = study()
    for _ in range(30):
        trial = s.ask()
        values = example.suggest(trial)
        assert list(values) == [n for n in example.names if n in values]
        assert trial.params == values  # fixed values are recorded too
        assert values["embedding_dim"] == 256
        small = values["model_type"] == "small"
        assert ("freeze" in values) != small  # no entry applies to a small model
        assert (3e-4 <= values["lr"] <= 3e-3) if small else (1e-5 <= values["lr"] <= 5e-4)
        if values["loss"] == "focal":
            assert values["smoothing"] == 0
        else:
            assert values["smoothing"] * 20 == pytest.approx(round(values["smoothing"] * 20))
        s.tell(trial, 1.0)
    seen = {(t.params["model_type"], t.params["loss"]) for t in s.trials}
    assert len(seen) == 6  # every branch ran, and Optuna accepted each param's distributions


def test_a_fixed_value_beside_a_range_is_suggested_as_a_one_point_range(example):
    s = study()
    s.enqueue_trial({"loss": "focal"})
    trial = s.ask()
    assert example.suggest(trial)["smoothing"] == 0.0
    assert trial.distributions["smoothing"] == FloatDistribution(0.0, 0.0)
    assert trial.distributions["embedding_dim"] == CategoricalDistribution([256])


def test_enqueued_values_are_honoured_and_steer_conditions(example):
    s = study()
    s.enqueue_trial({"model_type": "small", "lr": 1e-3, "warmup_epochs": 2})
    s.enqueue_trial({"model_type": "vit", "freeze": 2})
    first, second = example.suggest(s.ask()), example.suggest(s.ask())
    assert (first["model_type"], first["lr"], first["warmup_epochs"]) == ("small", 1e-3, 2)
    assert "freeze" not in first
    assert second["model_type"] == "vit" and second["freeze"] == 2


def test_fixed_numbers_under_conditions_share_one_kind(tmp_path):
    loaded = space.load(write(tmp_path, "m: {type: categorical, choices: [a, b]}\n"
                                        "n: [{value: 32, when: {m: a}}, {value: 64}]\n"))
    s = study()
    for model in ("a", "b"):
        s.enqueue_trial({"m": model})
        trial = s.ask()
        assert loaded.suggest(trial)["n"] == {"a": 32, "b": 64}[model]
        assert isinstance(trial.distributions["n"], IntDistribution)


# --- checking parameter sets -------------------------------------------------------------------

GOOD = {"model_type": "vit", "lr": 1e-4, "weight_decay": 1e-3, "warmup_epochs": 1, "freeze": 0,
        "loss": "ce", "smoothing": 0.1, "embedding_dim": 256}


def test_a_suggested_set_fits_and_applicable_names_its_entries(example):
    values = example.suggest(study().ask())
    assert example.check_values(values, partial=False) is None
    assert example.check_values(GOOD, partial=False) is None
    entries = example.applicable({**GOOD, "model_type": "small"})
    assert "freeze" not in entries and entries["lr"] == dict(example.params)["lr"][0]


@pytest.mark.parametrize("change, reason", [
    ({"lr": 0.5}, "lr 0.5 is above high 0.0005"),
    ({"weight_decay": 1e-9}, "weight_decay 1e-09 is below low 1e-06"),
    ({"foo": 1}, "unknown parameter 'foo'"),
    ({"loss": "x"}, "loss 'x' is not one of ['ce', 'focal']"),
    ({"model_type": "small", "lr": 1e-3}, "freeze is not used when model_type is 'small'"),
    ({"warmup_epochs": True}, "warmup_epochs True is not an int"),
    ({"warmup_epochs": 1.0}, "warmup_epochs 1.0 is not an int"),
    ({"smoothing": 0.12}, "smoothing 0.12 is not on the grid 0.0 + k * 0.05"),
    ({"weight_decay": "big"}, "weight_decay 'big' is not a number"),
    ({"loss": "focal"}, "smoothing 0.1 is not the fixed value 0"),
    ({"embedding_dim": 128}, "embedding_dim 128 is not the fixed value 256"),
])
def test_a_full_set_that_does_not_fit_gets_a_one_line_reason(example, change, reason):
    assert example.check_values({**GOOD, **change}, partial=False).startswith(reason)


def test_full_sets_need_every_used_parameter_partial_ones_do_not(example):
    values = {k: v for k, v in GOOD.items() if k != "weight_decay"}
    assert example.check_values(values, partial=False) == "missing 'weight_decay'"
    assert example.check_values(values, partial=True) is None
    assert example.check_values({"lr": 1}, partial=True) is not None
    assert example.check_values({"smoothing": 0}, partial=False) == "missing 'model_type'"
    assert example.check_values({"loss": "ce", "smoothing": 0}, partial=True) is None  # int fits


def test_a_partial_value_fits_any_entry_its_unknown_conditions_may_pick(example):
    assert example.check_values({"lr": 2e-3}, partial=True) is None  # fits when model is small
    assert example.check_values({"lr": 1e-5}, partial=True) is None  # fits otherwise
    assert example.check_values({"lr": 1e-2}, partial=True) == "lr 0.01 is above high 0.003"
    assert example.check_values({"model_type": "vit", "lr": 2e-3}, partial=True) == (
        "lr 0.002 is above high 0.0005")
    assert example.check_values({"freeze": 2}, partial=True) is None
    assert example.check_values({"loss": "focal", "smoothing": 0}, partial=True) is None
    assert example.check_values({"smoothing": 0.12}, partial=True) == (
        "smoothing 0.12 is not the fixed value 0")


def test_distributions_let_a_finished_trial_be_added(example):
    s = study()
    values = {**GOOD, "model_type": "small", "lr": 1e-3}
    del values["freeze"]
    dists = example.distributions(values)
    assert dists["embedding_dim"] == CategoricalDistribution([256])
    s.add_trial(optuna.trial.create_trial(params=values, distributions=dists, value=0.5))
    assert s.trials[0].params == values
    assert example.check_values(s.trials[0].params, partial=False) is None
    with pytest.raises(UsageError, match="space.yaml: lr 0.5 is above high"):
        example.distributions({**values, "lr": 0.5})


# --- sets to enqueue ---------------------------------------------------------------------------

def test_load_sets_checks_each_partial_set_and_drops_repeats(tmp_path, example):
    path = write(tmp_path, "- {model_type: vit, lr: 1e-4}\n- {loss: ce}\n"
                           "- {lr: 1.0e-4, model_type: vit}\n", "sets.yaml")
    assert space.load_sets(path, example) == [{"model_type": "vit", "lr": 1e-4}, {"loss": "ce"}]
    assert space.load_sets(path, None)[1] == {"loss": "ce"}


@pytest.mark.parametrize("text, problem", [
    ("lr: 0.1\n", "sets.yaml: holds a mapping, not a list of parameter sets"),
    ("", "sets.yaml: holds nothing"),
    ("- [1, 2]\n", "sets.yaml: set 1: [1, 2] is not a mapping"),
    ("- {lr: 1.0e-4}\n- {lr: [1, 2]}\n", "sets.yaml: set 2: lr: [1, 2] is not a single value"),
    ("- {lr: 1.0e-4}\n- {loss: ce}\n- {loss: mse}\n",
     "sets.yaml: set 3: loss 'mse' is not one of ['ce', 'focal']"),
    ("- {batch: 1}\n", "sets.yaml: set 1: unknown parameter 'batch'"),
    ("- {lr: 1.0e-4\n", "sets.yaml: malformed YAML at line 2"),
])
def test_load_sets_refuses_a_bad_file_naming_the_set(tmp_path, example, text, problem):
    with pytest.raises(UsageError) as caught:
        space.load_sets(write(tmp_path, text, "sets.yaml"), example)
    assert problem in str(caught.value) and "\n" not in str(caught.value)


def test_dotted_names_are_parameters_for_a_hydra_apps_nested_settings():
    parsed = space.parse({"optimizer.lr": {"type": "float", "low": 0.001, "high": 0.1},
                   "model.depth": {"type": "int", "low": 1, "high": 4,
                                   "when": {"optimizer.lr": 0.05}}}, "s.yaml")
    assert parsed.names == ("optimizer.lr", "model.depth")
    for bad in ("optimizer..lr", ".lr", "lr.", "1lr", "lr-rate"):
        with pytest.raises(UsageError, match="is not a name"):
            space.parse({bad: 1}, "s.yaml")

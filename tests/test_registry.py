"""`dskd.registry`: built-ins and third parties through entry points, in-process plugins, provenance, and every
way a plugin can be wrong turned into a `PluginError` that names it.

Third-party packages are faked without pip: a module plus a `<name>-<version>.dist-info/` folder
(`METADATA`, `entry_points.txt`) written into `tmp_path`, which is put first on `sys.path`; the real loader
(`importlib.metadata`) then discovers it exactly as if it were installed.
"""

from __future__ import annotations

import sys
import textwrap
import types
from pathlib import Path

import pytest

import dskd
from dskd.errors import PluginError
from dskd.registry import LOAD_ENV, load_registry, option_defaults

BUILTIN_DIVERGENCES = {
    "forward_kl",
    "reverse_kl",
    "js",
    "tvd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "adaptive_kl",
    "generalized_jsd",
}
BUILTIN_OBJECTIVES = {"sft", "kd", "dskd", "dskd_v2"}


def make_divergence(value: float):
    def divergence(student_logits, teacher_logits, *, temperature=1.0):
        return student_logits.new_full(student_logits.shape[:1], value)

    return divergence


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch):
    """Write a fake installed distribution: `make(dist, {ep_name: module}, {module: source})`."""
    monkeypatch.delenv(LOAD_ENV, raising=False)
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    imported: list[str] = []

    def make(dist: str, entry_points: dict[str, str], modules: dict[str, str], version: str = "0.1") -> None:
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        lines = "".join(f"{name} = {module}\n" for name, module in entry_points.items())
        (info / "entry_points.txt").write_text(f"[dskd]\n{lines}")
        for module, source in modules.items():
            (site / f"{module}.py").write_text(textwrap.dedent(source))
            imported.append(module)

    yield make
    for module in imported:  # modules from tmp_path must not leak into later tests
        sys.modules.pop(module, None)


DIVERGENCE_MODULE = """
    import dskd

    def {name}(student_logits, teacher_logits, *, temperature=1.0):
        return (student_logits - teacher_logits).abs().sum(-1)

    @dskd.hookimpl
    def dskd_register_divergences(register):
        register("{name}", {name})
"""


# ---------------------------------------------------------------------------------------------------------
# Built-ins
# ---------------------------------------------------------------------------------------------------------


def test_builtins_load_through_entry_points_with_their_package():
    registry = load_registry()
    assert BUILTIN_DIVERGENCES <= set(registry.divergences)
    assert BUILTIN_OBJECTIVES <= set(registry.objectives)
    assert "off_policy" in registry.policies
    registration = registry.registrations[("divergences", "forward_kl")]
    assert (registration.plugin, registration.package) == ("forward_kl", "dskd")
    assert registration.obj is registry.divergences["forward_kl"]
    info = {p.name: p for p in registry.plugins}
    assert info["kd"].package == "dskd" and info["kd"].registered == {"objectives": ["kd"]}
    assert info["kd"].version == dskd.__version__


def test_without_entry_points_nothing_is_registered():
    # Proves the built-ins above came through entry points, not through a hard-coded import.
    registry = load_registry(entry_points=False)
    assert not registry.divergences and not registry.objectives and not registry.policies and not registry.aligners


def test_unknown_name_lists_the_known_ones():
    registry = load_registry()
    with pytest.raises(PluginError, match=r"unknown divergence 'nope'; known divergences: adaptive_kl, forward_kl"):
        registry.get("divergences", "nope")


def test_describe_has_one_sorted_list_per_family_and_the_plugins():
    described = load_registry().describe()
    assert set(described) == {"divergences", "aligners", "policies", "objectives", "plugins"}
    assert described["divergences"] == sorted(described["divergences"])
    forward = next(p for p in described["plugins"] if p["name"] == "forward_kl")
    assert forward == {
        "name": "forward_kl",
        "package": "dskd",
        "version": dskd.__version__,
        "registered": {"divergences": ["forward_kl"]},
    }


# ---------------------------------------------------------------------------------------------------------
# In-process plugins (extra_plugins)
# ---------------------------------------------------------------------------------------------------------


class TwoFamilies:
    """A plugin object: a class instance with `@dskd.hookimpl` methods, as a test or notebook writes one."""

    @staticmethod
    def my_div(student_logits, teacher_logits, *, temperature=1.0, scale=2.0):
        return (student_logits - teacher_logits).sum(-1) * scale

    @staticmethod
    def my_policy(context, *, every=1):
        return context

    @dskd.hookimpl
    def dskd_register_divergences(self, register):
        register("my_div", self.my_div)

    @dskd.hookimpl
    def dskd_register_policies(self, register):
        register("my_policy", self.my_policy)


def test_extra_plugin_object_registers_in_several_families_with_provenance():
    registry = load_registry(extra_plugins=[TwoFamilies()])
    assert registry.get("divergences", "my_div") is TwoFamilies.my_div
    assert registry.get("policies", "my_policy") is TwoFamilies.my_policy
    registration = registry.registrations[("divergences", "my_div")]
    assert registration.plugin == "TwoFamilies-0"
    assert registration.package == __name__  # the module that defined the plugin object
    info = next(p for p in registry.plugins if p.name == "TwoFamilies-0")
    assert info.registered == {"divergences": ["my_div"], "policies": ["my_policy"]}
    assert "forward_kl" in registry.divergences  # the built-ins are still there


def test_extra_plugin_module_is_named_after_the_module():
    module = types.ModuleType("my_plugin_module")
    module.shifted = make_divergence(1.0)

    @dskd.hookimpl
    def dskd_register_divergences(register):
        register("shifted", module.shifted)

    module.dskd_register_divergences = dskd_register_divergences
    registry = load_registry(extra_plugins=[module], entry_points=False)
    assert registry.registrations[("divergences", "shifted")].plugin == "my_plugin_module"
    assert list(registry.divergences) == ["shifted"]


def test_hook_implementations_may_omit_the_register_argument():
    calls = []

    class Observer:
        @dskd.hookimpl
        def dskd_register_objectives(self):
            calls.append("called")

    load_registry(extra_plugins=[Observer()], entry_points=False)
    assert calls == ["called"]


# ---------------------------------------------------------------------------------------------------------
# Plugin errors
# ---------------------------------------------------------------------------------------------------------


def test_duplicate_name_names_both_plugins():
    class Shadow:
        @dskd.hookimpl
        def dskd_register_divergences(self, register):
            register("forward_kl", make_divergence(0.0))

    with pytest.raises(PluginError) as info:
        load_registry(extra_plugins=[Shadow()])
    message = str(info.value)
    assert "divergence 'forward_kl' is registered twice" in message
    assert "plugin 'forward_kl' (dskd)" in message and "plugin 'Shadow-0'" in message


def test_duplicate_name_between_two_in_process_plugins():
    class First:
        @dskd.hookimpl
        def dskd_register_policies(self, register):
            register("same", make_divergence(0.0))

    class Second(First):
        pass

    with pytest.raises(PluginError, match=r"policy 'same' is registered twice") as info:
        load_registry(extra_plugins=[First(), Second()], entry_points=False)
    assert "plugin 'First-0'" in str(info.value) and "plugin 'Second-1'" in str(info.value)


def test_misspelt_hook_fails_check_pending():
    class Typo:
        @dskd.hookimpl
        def dskd_register_divergance(self, register):
            register("typo", make_divergence(0.0))

    with pytest.raises(PluginError) as info:
        load_registry(extra_plugins=[Typo()], entry_points=False)
    message = str(info.value)
    assert "dskd_register_divergance" in message
    assert "dskd_register_<family>" in message and "divergences" in message


def test_hook_with_a_wrongly_named_argument_is_invalid():
    class WrongArgument:
        @dskd.hookimpl
        def dskd_register_divergences(self, registrar):
            registrar("x", make_divergence(0.0))

    with pytest.raises(PluginError, match=r"plugin 'WrongArgument-0' is invalid.*registrar") as info:
        load_registry(extra_plugins=[WrongArgument()], entry_points=False)
    assert "\n" not in str(info.value)  # the CLI prints errors as one line; pluggy's message has several


def test_hook_that_raises_is_reported_with_the_plugin_name():
    class Exploding:
        @dskd.hookimpl
        def dskd_register_aligners(self, register):
            raise RuntimeError("tokenizer table missing")

    with pytest.raises(PluginError) as info:
        load_registry(extra_plugins=[Exploding()], entry_points=False)
    message = str(info.value)
    assert "plugin 'Exploding-0'" in message and "dskd_register_aligners" in message
    assert "RuntimeError: tokenizer table missing" in message
    assert isinstance(info.value.__cause__, RuntimeError)


@pytest.mark.parametrize("name", ["BadName", "has-dash", "1st", "", "with space"])
def test_registered_name_must_be_snake_case(name):
    class BadName:
        @dskd.hookimpl
        def dskd_register_divergences(self, register):
            register(name, make_divergence(0.0))

    with pytest.raises(PluginError, match=r"registered the divergence name .* names are lowercase snake_case"):
        load_registry(extra_plugins=[BadName()], entry_points=False)


def test_registered_object_must_be_callable():
    class NotCallable:
        @dskd.hookimpl
        def dskd_register_objectives(self, register):
            register("constant", 42)

    expected = r"plugin 'NotCallable-0' registered objective 'constant' with a non-callable 42"
    with pytest.raises(PluginError, match=expected):
        load_registry(extra_plugins=[NotCallable()], entry_points=False)


# ---------------------------------------------------------------------------------------------------------
# Entry-point discovery (fake installed distributions)
# ---------------------------------------------------------------------------------------------------------


def test_entry_point_of_an_installed_package_is_discovered(fake_package):
    fake_package(
        "dskd-fake-div",
        {"fake_div": "fake_div_module"},
        {"fake_div_module": DIVERGENCE_MODULE.format(name="fake_div")},
        version="1.2.3",
    )
    registry = load_registry()
    assert "fake_div" in registry.divergences
    assert BUILTIN_DIVERGENCES <= set(registry.divergences)
    registration = registry.registrations[("divergences", "fake_div")]
    assert (registration.plugin, registration.package) == ("fake_div", "dskd-fake-div")
    info = next(p for p in registry.plugins if p.name == "fake_div")
    assert (info.package, info.version, info.registered) == ("dskd-fake-div", "1.2.3", {"divergences": ["fake_div"]})
    # Third parties are listed after the built-ins, so `dskd plugins` is stable.
    assert [p.package for p in registry.plugins][-1] == "dskd-fake-div"


def test_package_whose_module_fails_to_import_is_named(fake_package):
    fake_package("dskd-broken", {"broken": "broken_module"}, {"broken_module": "import not_a_real_module_xyz\n"})
    with pytest.raises(PluginError) as info:
        load_registry()
    message = str(info.value)
    assert "plugin 'broken' from package 'dskd-broken' failed to load" in message
    assert "not_a_real_module_xyz" in message and LOAD_ENV in message


def test_entry_point_name_taken_by_a_builtin_names_both_packages(fake_package):
    fake_package(
        "dskd-impostor",
        {"forward_kl": "impostor_module"},
        {"impostor_module": DIVERGENCE_MODULE.format(name="impostor")},
    )
    with pytest.raises(PluginError, match=r"plugin name 'forward_kl' is provided by both 'dskd' and 'dskd-impostor'"):
        load_registry()


def test_entry_point_registering_a_builtin_name_names_both_plugins(fake_package):
    fake_package("dskd-shadow", {"shadow": "shadow_module"}, {"shadow_module": DIVERGENCE_MODULE.format(name="js")})
    with pytest.raises(PluginError, match=r"divergence 'js' is registered twice") as info:
        load_registry()
    assert "plugin 'js' (dskd)" in str(info.value) and "plugin 'shadow' (dskd-shadow)" in str(info.value)


def test_entry_point_with_a_misspelt_hook_fails(fake_package):
    source = """
        import dskd

        @dskd.hookimpl
        def dskd_register_divergance(register):
            pass
    """
    fake_package("dskd-typo", {"typo": "typo_module"}, {"typo_module": source})
    with pytest.raises(PluginError, match="dskd_register_divergance"):
        load_registry()


# ---------------------------------------------------------------------------------------------------------
# DSKD_LOAD_PLUGINS
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def two_packages(fake_package):
    fake_package("dskd-alpha", {"alpha": "alpha_module"}, {"alpha_module": DIVERGENCE_MODULE.format(name="alpha")})
    fake_package("dskd-beta", {"beta": "beta_module"}, {"beta_module": DIVERGENCE_MODULE.format(name="beta")})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, {"alpha", "beta"}),  # unset: everything installed loads
        ("", set()),  # empty: no third-party plugin
        ("dskd-alpha", {"alpha"}),  # a distribution name
        ("beta", {"beta"}),  # an entry-point name
        (" DSKD-Alpha , beta ", {"alpha", "beta"}),  # a list, case and spaces ignored
        ("something-else", set()),
    ],
)
def test_load_plugins_env_restricts_third_party_plugins_only(two_packages, monkeypatch, value, expected):
    if value is not None:
        monkeypatch.setenv(LOAD_ENV, value)
    divergences = set(load_registry().divergences)
    assert divergences & {"alpha", "beta"} == expected
    assert BUILTIN_DIVERGENCES <= divergences  # built-ins always load


def test_load_plugins_env_steps_around_a_broken_package(fake_package, monkeypatch):
    fake_package("dskd-broken", {"broken": "broken_module"}, {"broken_module": "raise ImportError('boom')\n"})
    monkeypatch.setenv(LOAD_ENV, "")
    assert "forward_kl" in load_registry().divergences


# ---------------------------------------------------------------------------------------------------------
# option_defaults
# ---------------------------------------------------------------------------------------------------------


def test_option_defaults_are_the_keyword_parameters_with_defaults():
    def divergence(student_logits, teacher_logits, *, temperature=1.0, lam=0.1, mode="sum"):
        raise AssertionError

    assert option_defaults(divergence) == {"temperature": 1.0, "lam": 0.1, "mode": "sum"}
    assert option_defaults(divergence, skip=("temperature",)) == {"lam": 0.1, "mode": "sum"}


def test_option_defaults_ignore_inputs_and_variadic_parameters():
    def factory(context, tokenizer, top_k=8, *args, required_keyword, flag=False, **kwargs):
        raise AssertionError

    assert option_defaults(factory) == {"top_k": 8, "flag": False}


def test_option_defaults_of_a_class_are_its_constructor_options():
    class Aligner:
        def __init__(self, teacher_tokenizer, student_tokenizer, *, keep_spaces=False):
            pass

    assert option_defaults(Aligner) == {"keep_spaces": False}


def test_option_defaults_of_builtin_plugins():
    registry = load_registry()
    assert option_defaults(registry.divergences["skew_forward_kl"], skip=("temperature",)) == {"lam": 0.1}
    assert option_defaults(registry.divergences["forward_kl"], skip=("temperature",)) == {}
    assert option_defaults(registry.objectives["kd"]) == {"teacher_signal": "hidden", "top_k": 64}

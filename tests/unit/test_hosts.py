"""SSH hosts in the config, host choice, and the remote command line (pure parts)."""

from __future__ import annotations

import shlex
import textwrap
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.config import ConfigError, parse_config
from conveyor.executors.ssh import (
    _WRAPPER,
    beat,
    kill_script,
    remote_command,
    signalled,
    silence,
)
from conveyor.hosts import Host, pick_host

HOST = """
[hosts.proc1]
address = "10.0.0.5"
user = "spotbot"
key_file = "keys/id_ed25519"
known_hosts = "keys/known_hosts"
concurrency = 2
path_map = { "/mnt/p/" = "/data/p/" }
"""


def parse(toml: str, tmp_path: Path):
    return parse_config(
        tomllib.loads(textwrap.dedent(toml)), tmp_path, {"CONVEYOR_DATABASE_URL": "sqlite://"}
    )


def test_hosts_and_an_ssh_pipeline_are_read(tmp_path: Path) -> None:
    cfg = parse(
        HOST
        + """
[pipelines.remote]
executor = "ssh"
hosts = ["proc1"]
command = ["spotbot", "{bin}"]
cwd = "/srv/spotbot"
paths = ["bin"]
roots = ["/mnt/p"]
path_map = { "P:/" = "/mnt/p/" }
""",
        tmp_path,
    )
    host = cfg.hosts["proc1"]
    assert host.port == 22 and host.concurrency == 2
    assert host.key_file == str(tmp_path / "keys" / "id_ed25519")
    assert host.known_hosts == str(tmp_path / "keys" / "known_hosts")
    assert not host.insecure_skip_host_key_check  # strict by default
    assert host.path_map == (("/mnt/p/", "/data/p/"),)
    pipeline = cfg.pipelines["remote"]
    assert pipeline.hosts == (host,)
    assert pipeline.cwd == "/srv/spotbot"  # a path on the host, left as written
    assert pipeline.paths.roots == ("/mnt/p",)
    assert pipeline.check_params({"bin": "p:\\x.bin"}) == [{"bin": "/mnt/p/x.bin"}]


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[pipelines.r]\nexecutor = "ssh"\ncommand = ["x"]\n', "needs hosts"),
        (
            '[pipelines.r]\nexecutor = "ssh"\nhosts = ["nope"]\ncommand = ["x"]\n',
            r"no \[hosts.nope\]",
        ),
        ('[pipelines.r]\nexecutor = "ssh"\nhosts = ["proc1"]\n', "needs command"),
        ('[pipelines.r]\nexecutor = "command"\ncommand = ["x"]\npaths = ["a"]\n', "no roots"),
        (
            '[pipelines.r]\nexecutor = "command"\ncommand = ["x"]\n'
            'paths = ["a"]\nroots = ["rel"]\n',
            "not an absolute path",
        ),
        (
            '[pipelines.r]\nexecutor = "command"\ncommand = ["x"]\n'
            'paths = ["a..b"]\nroots = ["/r"]\n',
            "bad path selector",
        ),
        ('[hosts.h]\naddress = "a"\n', "user"),
        ('[hosts.h]\naddress = "a"\nuser = "u"\nconcurrency = 0\n', "concurrency"),
        ('[hosts.h]\naddress = "a"\nuser = "u"\nknown_host = "x"\n', "known_host"),
    ],
)
def test_bad_host_and_path_settings_are_named(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(HOST + toml, tmp_path)


def host(name: str, slots: int) -> Host:
    return Host(name=name, address="a", user="u", concurrency=slots)


def test_the_least_loaded_host_with_a_free_slot_is_picked() -> None:
    hosts = (host("a", 2), host("b", 4))
    assert pick_host(hosts, {}).name == "a"  # ties: the first from `start`
    assert pick_host(hosts, {}, start=1).name == "b"
    assert pick_host(hosts, {"a": 1}).name == "b"  # 1/2 busy vs 0/4
    assert pick_host(hosts, {"a": 1, "b": 2}).name == "a"  # 0.5 vs 0.5: first
    assert pick_host(hosts, {"a": 2, "b": 3}).name == "b"
    assert pick_host(hosts, {"a": 2, "b": 4}) is None


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))),
        min_size=1,
        max_size=6,
    ),
    st.dictionaries(
        st.from_regex(r"[A-Z_][A-Z0-9_]{0,8}", fullmatch=True),
        st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))),
        max_size=3,
    ),
)
def test_the_remote_shell_gets_back_exactly_the_argv(argv: list[str], env: dict[str, str]) -> None:
    line = remote_command(argv, env, "/srv/x y", 60)
    words = shlex.split(line)
    assert words[:4] == ["cd", "/srv/x y", "&&", "exec"]
    rest = words[4:]
    assert rest[0] == "env"
    assert rest[1 : 1 + len(env)] == [f"{k}={v}" for k, v in env.items()]
    assert rest[1 + len(env) :] == ["setsid", "-w", "sh", "-c", _WRAPPER, "conveyor", "60", *argv]


def test_the_watcher_waits_longer_than_the_worker_takes_to_give_up() -> None:
    default = Host(name="h", address="a", user="u")
    # 15 s of quiet and 3 unanswered keepalives, plus the dot's 7.5 s
    assert (beat(default), silence(default)) == (7.5, 68)
    brisk = Host(name="h", address="a", user="u", keepalive_interval=0.5, keepalive_count_max=2)
    assert (beat(brisk), silence(brisk)) == (0.25, 10)  # never under 10 s
    slow = Host(name="h", address="a", user="u", keepalive_interval=60, keepalive_count_max=5)
    assert (beat(slow), silence(slow)) == (30, 390)


def test_the_kill_script_names_only_the_group() -> None:
    script = kill_script(4242, 1.0)
    assert "kill -TERM -4242" in script and "kill -KILL -4242" in script
    assert kill_script(4242, 0) == "kill -KILL -4242 2>/dev/null; exit 0"


def test_a_signal_is_told_from_an_exit_code_by_what_setsid_says() -> None:
    said = "setsid: child 4242 did not exit normally\n"
    assert signalled(9, said) == 9
    assert signalled(15, said) == 15
    assert signalled(0x80 | 11, said) == 11  # with a core dump
    assert signalled(9, "") is None  # the command's own exit 9: setsid says nothing
    assert signalled(9, "a login banner\n") is None
    # setsid's own failure (exit 1) is no signal; another language's wording still is
    assert signalled(1, "setsid: failed to execute sh: No such file or directory\n") is None
    assert signalled(1, said) == 1  # SIGHUP
    assert signalled(15, "setsid: Kindprozess 4242 wurde nicht normal beendet\n") == 15

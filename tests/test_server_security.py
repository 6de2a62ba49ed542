"""Listening policy, token files and TLS option errors of the teacher server."""

from __future__ import annotations

import pytest

from dskd.servers.security import (
    ServerSetupError,
    bind_address,
    check_listen_policy,
    is_loopback,
    read_token_file,
    server_credentials,
)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_hosts_are_recognised(host):
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "teacher.example.com"])
def test_other_hosts_are_not_loopback(host):
    assert not is_loopback(host)


def test_wide_address_without_token_is_refused_unless_insecure():
    with pytest.raises(ServerSetupError, match="--auth-token-file"):
        check_listen_policy("0.0.0.0", token=None, insecure=False)
    check_listen_policy("0.0.0.0", token=None, insecure=True)
    check_listen_policy("0.0.0.0", token="t", insecure=False)
    check_listen_policy("127.0.0.1", token=None, insecure=False)


def test_ipv6_bind_address_is_bracketed():
    assert bind_address("::1", 5) == "[::1]:5"
    assert bind_address("[::]", 5) == "[::]:5"
    assert bind_address("127.0.0.1", 5) == "127.0.0.1:5"


def test_token_file_is_read_and_stripped(tmp_path):
    path = tmp_path / "token"
    path.write_text("abc123\n")
    assert read_token_file(path) == "abc123"


@pytest.mark.parametrize("content", ["", "  \n", "two words"])
def test_empty_or_spaced_token_is_refused(tmp_path, content):
    path = tmp_path / "token"
    path.write_text(content)
    with pytest.raises(ServerSetupError, match="holds no token"):
        read_token_file(path)


def test_missing_token_file_is_refused(tmp_path):
    with pytest.raises(ServerSetupError, match="cannot read it"):
        read_token_file(tmp_path / "nope")


def test_missing_tls_files_are_refused(tmp_path):
    with pytest.raises(ServerSetupError, match="TLS: cannot read"):
        server_credentials(tmp_path / "cert.pem", tmp_path / "key.pem")

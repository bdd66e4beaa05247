"""Thread counts: precedence of --threads, the environment and OMP, and every model command setting and restoring it."""

from __future__ import annotations

import pytest
import torch

import promptus
from promptus.commands.main import build_parser, main
from promptus.config import THREADS_ENV
from promptus.errors import PromptusError
from promptus.threads import cpu_thread_count

from synthetic import tiny_file


def test_thread_count_precedence_flag_env_omp_model():
    assert cpu_thread_count("tiny", environ={})[0] == 1  # the measured best for the tiny model
    assert cpu_thread_count("sd-turbo", environ={})[0] is None  # torch's default
    assert cpu_thread_count("tiny", environ={"OMP_NUM_THREADS": "2"})[0] is None  # torch already follows it
    assert cpu_thread_count("tiny", environ={THREADS_ENV: "3", "OMP_NUM_THREADS": "2"})[0] == 3
    assert cpu_thread_count("tiny", 2, environ={THREADS_ENV: "3"}) == (2, "--threads")
    for bad in ("0", "two", "-1"):
        with pytest.raises(PromptusError, match="whole number"):
            cpu_thread_count("tiny", environ={THREADS_ENV: bad})


def test_every_model_command_takes_threads():
    parser = build_parser()
    for command in ("encode", "decode", "demo", "serve", "play", "studio"):
        args = parser.parse_args([command, "x", "-o", "y", "--threads", "2"] if command in ("encode", "decode")
                                 else [command, "x", "--threads", "2"] if command in ("serve", "play")
                                 else [command, "--threads", "2"])
        assert args.threads == 2, command


def test_commands_set_the_thread_count_and_put_it_back(tmp_path, tiny, keep_threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(THREADS_ENV, raising=False)
    path = tiny_file(tmp_path, tiny)
    seen = []
    real = promptus.decoder.Decoder.__init__

    def spy(self, *a, **k):
        seen.append(torch.get_num_threads())
        real(self, *a, **k)

    monkeypatch.setattr(promptus.decoder.Decoder, "__init__", spy)
    torch.set_num_threads(2)
    assert main(["-q", "decode", str(path), "-o", f"{tmp_path / 'a'}/", "--device", "cpu"]) == 0
    assert main(["-q", "decode", str(path), "-o", f"{tmp_path / 'b'}/", "--device", "cpu", "--threads", "2"]) == 0
    monkeypatch.setenv(THREADS_ENV, "3")
    assert main(["-q", "decode", str(path), "-o", f"{tmp_path / 'c'}/", "--device", "cpu"]) == 0
    assert seen == [1, 2, 3]
    assert torch.get_num_threads() == 2  # the caller's count is back after every command
